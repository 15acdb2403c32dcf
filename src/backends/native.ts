/**
 * Registry entries of the native addon's backends (cuda: the sm_90a kernels; cpu: the core built
 * for this machine). Loading, probing and the ops live in src/backends/native/.
 */
export { cpuBackendEntry } from './native/cpu_backend.js';
export { cudaBackendEntry } from './native/cuda_backend.js';
