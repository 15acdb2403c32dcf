/**
 * Registry entries of the native addon's backends (cuda: sm_90a kernels; cpu: the core built
 * natively). The addon is not part of this release: both entries probe as unavailable with the
 * reason and how to get it, so `auto` falls through to wasm and `info` can say why.
 */
import { SparseMlaError } from '../errors.js';
import type { BackendEntry, BackendProbe } from './backend.js';

const NOT_BUILT =
  'not built: the native addon (node-addon-api, built by cmake-js from native/) is not part of this release yet; ' +
  'it arrives with the CUDA issue. Use backend "wasm" (or "auto") meanwhile';

function nativeEntry(name: 'cuda' | 'cpu', priority: number, what: string): BackendEntry {
  const probe = async (): Promise<BackendProbe> => ({ available: false, reason: `${what}: ${NOT_BUILT}` });
  return {
    name,
    priority,
    probe,
    async create() {
      throw new SparseMlaError('BACKEND_UNAVAILABLE', `backend "${name}" is unavailable — ${(await probe()).reason}`, 'backend');
    },
  };
}

export const cudaBackendEntry = nativeEntry('cuda', 10, 'CUDA backend (sm_90a kernels for Hopper GPUs)');
export const cpuBackendEntry = nativeEntry('cpu', 20, 'native CPU backend (the C++ core built for this machine)');
