/**
 * The `cuda` backend's registry entry. Available iff the addon loads, was built with CUDA, a
 * device answers, and the addon carries the CUDA ops; otherwise the reason says which of these is
 * missing. The op launchers (native/cuda kernels behind the addon's `cuda` table) plug in here;
 * until they do, a machine with a GPU reports the device and that the ops are not wired yet.
 */
import { SparseMlaError } from '../../errors.js';
import type { BackendEntry, BackendProbe } from '../backend.js';
import { HOW_TO_BUILD, loadNativeAddon, queryCudaDevices } from './binding.js';

const GiB = 2 ** 30;

async function probeCuda(): Promise<BackendProbe> {
  const l = loadNativeAddon();
  if (!l.ok) return { available: false, reason: l.reason, details: { addon: l.path } };
  const cuda = l.addon.cuda;
  if (!cuda.built) return { available: false, reason: `addon built without CUDA (nvcc not found at install): ${HOW_TO_BUILD}`, details: { addon: l.path } };
  const q = queryCudaDevices(l.addon)!;
  const details: Record<string, string | number | boolean> = {
    addon: l.path,
    arch: cuda.arch,
    nvcc: cuda.compilerVersion,
    cudaRuntime: q.runtimeVersion,
    cudaDriver: q.driverVersion,
    devices: q.count,
  };
  if (q.count === 0) return { available: false, reason: `no CUDA device: ${q.error ?? 'cudaGetDeviceCount found 0 devices'}`, details };
  const d = q.devices[0]!;
  Object.assign(details, { device: d.name, computeCapability: d.computeCapability, sms: d.multiProcessors, memoryGiB: Math.round((d.memoryBytes / GiB) * 10) / 10 });
  if (d.computeCapability !== '9.0') return { available: false, reason: `device 0 (${d.name}) is compute capability ${d.computeCapability}; the kernels are built for sm_90a (Hopper) only`, details };
  // The launch probe (a tiny kernel on the device) comes with the op launchers.
  return { available: false, reason: `${d.name} found, but this addon has no CUDA op launchers yet (the kernels are not wired into the backend)`, details };
}

export const cudaBackendEntry: BackendEntry = {
  name: 'cuda',
  priority: 10,
  probe: probeCuda,
  async create() {
    const p = await probeCuda();
    throw new SparseMlaError('BACKEND_UNAVAILABLE', `backend "cuda" is unavailable — ${p.reason}`, 'backend');
  },
};
