/**
 * The typed binding of the native addon (native/addon/) — the only file that knows the addon's
 * export names and argument types (the cpu and cuda kernel ops' params from ../abi.ts), and the
 * one place that loads it. Which file is loaded follows native/addon_locate.mjs: the package's
 * prebuilt addon for this platform and CPU, or the one built here by native/install.mjs, in the
 * order the install chose; SPARSE_MLA_NATIVE_ADDON=<path> loads that file only (tests; a build
 * kept elsewhere).
 *
 * Loading never throws: loadNativeAddon() returns the addon or why it is not there (including what
 * the install recorded: a failed build with its log's absolute path), once per process.
 */
import { existsSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import { SparseMlaError, disposedError } from '../../errors.js';
import type { CudaOpName, CudaOpParams, OpName, OpParams } from '../abi.js';
import {
  ADDON_PATH_ENV,
  SOURCE_BUILD_ADDON,
  addonCandidates,
  addonSourceFingerprint,
  howToBuild,
  readInstallStatus,
  selectPrebuilt,
  type AddonCandidate,
  type InstallStatus,
  type PrebuiltChoice,
} from '../../../native/addon_locate.mjs';

export { ADDON_PATH_ENV };
export type { InstallStatus };

/** Where a source build puts the addon (the package's build/addon/Release/). */
export const ADDON_PATH = SOURCE_BUILD_ADDON;

/** The ABI version this binding is written against (SMLA_ABI_VERSION). */
export const ABI_VERSION = 2;

/** The ops of the addon's `cpu` table (native/addon/cpu_ops.cpp), each one op of the C ABI. */
const CPU_OPS = ['sparsePrefill', 'pagedSparseAttention', 'dequantizeKvCache', 'quantizeKvCache'] as const satisfies readonly OpName[];

/** How to get an addon here, for every "not available" message. */
export const HOW_TO_BUILD = howToBuild();

/**
 * The CPU ops: each takes the thread count, the op's params object (../abi.ts: the C ABI's params
 * struct as an object, read into it by the op's binding file in native/addon/) and optionally the
 * calling engine's group (an int32 >= 0, default 0), runs the core on `threads` threads split by
 * rows, on the addon's own threads (queued process-wide; neither the event loop nor libuv's pool),
 * and resolves when the outputs (the arrays passed in, exact lengths) are written.
 * `cancelQueued(group)` rejects this thread's calls of `group` that have not started yet, with
 * code 'SMLA_CANCELLED', and returns how many. A Worker ended mid-call stops its running calls
 * at their next block of rows; nothing is written after its teardown returns. Inputs may be detached by the caller at any time:
 * the addon reads a SharedArrayBuffer in place and copies anything else when the call is made
 * (native/addon/addon.h). Outputs must be fresh arrays that nobody else can reach until the call
 * settles. quantizeKvCache writes the cache only when it settles, on this thread (a cache detached
 * meanwhile: 'SMLA_DETACHED', nothing written); duplicate ids: the last row wins.
 * Rejections carry `code` 'SMLA_CORE_STATUS' (or 'SMLA_CUDA_ERROR' from a CUDA op) and `status`
 * (the core's status name / "cudaErrorX: message"); arguments that do not match throw with code
 * 'SMLA_ADDON_ARGUMENT', an input copy that cannot be allocated with 'SMLA_OUT_OF_MEMORY' (so do
 * the device outputs of a layer program's run, and any other allocation of the addon for a call,
 * thrown or as the rejection); a call for which no thread can be started rejects with
 * 'SMLA_NO_THREAD', any other native exception with 'SMLA_ADDON_FAILURE'.
 * addonFailure() turns all of these into typed errors.
 */
export type NativeCpuOps = {
  [Op in (typeof CPU_OPS)[number]]: (threads: number, params: OpParams<Op>, group?: number) => Promise<void>;
} & { cancelQueued(group: number): number };

/**
 * A device allocation of the addon (native/addon/cuda_stream.cpp DeviceBuffer): stream-ordered
 * cudaMallocAsync on the backend's stream; free() drops this handle (the memory goes back once no
 * queued op uses it), and the JS object's finalizer does the same when it is collected.
 */
export interface NativeDeviceBuffer {
  readonly byteLength: number;
  /** the CUDA device it lives on */
  readonly device: number;
  readonly freed: boolean;
  free(): void;
}

/** An engine's CUDA stream on one device: every op and allocation names it (cuda_stream.cpp). */
export interface NativeStream {
  readonly device: number;
  /** resolves once everything queued on the stream has finished (a pool thread waits) */
  synchronize(): Promise<void>;
  /** whether everything queued on the stream has finished, without waiting (throws for a failed stream) */
  query(): boolean;
}

/**
 * The CUDA kernel ops (native/addon/cuda_ops.cpp): each takes the op's params object (../abi.ts,
 * CUDA_OP_PARAMS: the fields of the C ABI struct its launcher takes, read into it by the op's
 * binding file in native/addon/; an array a host typed array or a device buffer of exactly its
 * bytes) and the engine's stream. An op whose operands are all device buffers of that stream is
 * enqueued at once and settles at once (stream-ordered); one with a host operand stages it,
 * launches, copies host outputs back and resolves when the stream has finished. dequantizeKvCache:
 * host tokenIds are checked by the caller (the kernel re-checks; one outside the cache rejects
 * with SMLA_ERR_OUT_OF_RANGE), device ones (int64, a plan's, range-checked when uploaded) give a
 * zero row, never read; with outRowOffset, out is a device buffer of at least outRowOffset +
 * numTokens rows (a plan's device workspace). planRows / planCompressedTokenIds
 * (native/cuda/planner.cu): the planner's rows and compressed ids built on the device.
 * Rejections carry code 'SMLA_CUDA_ERROR' (status "cudaErrorX: message") or 'SMLA_CORE_STATUS'.
 */
export type NativeCudaKernelOps = {
  [Op in CudaOpName]: (params: CudaOpParams<Op, NativeDeviceBuffer>, stream: NativeStream) => Promise<void>;
};

/** The addon's `cuda.ops` table: the kernel ops, memory ops, timing and the two classes (native/addon/cuda_stream.cpp). */
export interface NativeCudaOps extends NativeCudaKernelOps {
  /** host → device; data must have exactly buffer.byteLength bytes; resolves when done */
  upload(buffer: NativeDeviceBuffer, data: ArrayBufferView, stream: NativeStream): Promise<void>;
  /**
   * device → host; data must have exactly buffer.byteLength bytes; resolves when done. A read of at
   * most 256 bytes is queued on the stream by the call itself (into pinned memory), so it reads what
   * the ops queued before it wrote and nothing queued after.
   */
  download(buffer: NativeDeviceBuffer, data: ArrayBufferView, stream: NativeStream): Promise<void>;
  /** device → device on the stream's device, equal sizes (stream-ordered) */
  copyDevice(dst: NativeDeviceBuffer, src: NativeDeviceBuffer, stream: NativeStream): Promise<void>;
  /** dst (dstStream's device) ← src (srcStream's device, after its queued work); resolves when done */
  copyPeer(dst: NativeDeviceBuffer, dstStream: NativeStream, src: NativeDeviceBuffer, srcStream: NativeStream): Promise<void>;
  /** dst filled with repeats of src (stream-ordered) */
  fillDevice(dst: NativeDeviceBuffer, src: NativeDeviceBuffer, stream: NativeStream): Promise<void>;
  /** CUDA events around every launch from now on (benchmarks), or none */
  setTiming(on: boolean): void;
  /** device milliseconds of each timed launch on the stream since the last call, in order (waits for them; staging copies excluded) */
  takeKernelMs(stream: NativeStream): number[];
  /** the same launches as [start, end] pairs (flattened) in device ms from the first one's start */
  takeKernelSpans(stream: NativeStream): number[];
  /** one real kernel launch on the stream's device (a known one-token dequant), checked */
  probeLaunch(stream: NativeStream): Promise<void>;
  memInfo(stream: NativeStream): { free: number; total: number; error?: string };
  /**
   * the DeviceBuffer class: `new (deviceBufferClass())(bytes, stream)` allocates (throws
   * SMLA_CUDA_ERROR); `new …(bytes, stream, base, byteOffset)` is a view inside base (byteOffset a
   * multiple of 256; no CUDA call), the memory going back once base and every view have let go
   */
  deviceBufferClass(): new (bytes: number, stream: NativeStream, base?: NativeDeviceBuffer, byteOffset?: number) => NativeDeviceBuffer;
  /** the Stream class: `new (streamClass())(device)` (throws SMLA_CUDA_ERROR for a missing device) */
  streamClass(): new (device: number) => NativeStream;
  /**
   * The LayerProgram class (native/addon/layer_program.cpp): `new (layerProgramClass())(params, stream)` reads a
   * workspace layer's launches once (the ops' params objects, every array a device buffer of the
   * stream; throws SMLA_ADDON_ARGUMENT like the ops).
   */
  layerProgramClass(): new (params: LayerProgramParams, stream: NativeStream) => NativeLayerProgram;
}

/** A layer as the addon's LayerProgram reads it: a workspace layer's ops or a paged layer's one op. */
export type LayerProgramParams = WorkspaceLayerProgramParams | PagedLayerProgramParams;

/** A paged layer: the paged op's params, its outputs null (each run allocates them). */
export interface PagedLayerProgramParams {
  paged: Omit<CudaOpParams<'pagedSparseAttention', NativeDeviceBuffer>, 'out' | 'maxLogits' | 'lse'> & { out: null; maxLogits: null; lse: null };
}

/** A workspace layer as the addon's LayerProgram reads it: the ops' params objects, in launch order. */
export interface WorkspaceLayerProgramParams {
  /** a c4 combine into rows the plan keeps (its droppedTotal a device buffer), or null */
  planRows: CudaOpParams<'planRows', NativeDeviceBuffer> | null;
  /** device ids and an outRowOffset each */
  dequants: CudaOpParams<'dequantizeKvCache', NativeDeviceBuffer>[];
  /** its outputs null: each run allocates them */
  prefill: Omit<CudaOpParams<'sparsePrefill', NativeDeviceBuffer>, 'out' | 'maxLogits' | 'lse'> & { out: null; maxLogits: null; lse: null };
}

/** A layer program: a layer is one run(droppedInto, smScale, ...inputs), which queues all of it. */
export interface NativeLayerProgram {
  /** "planRows.topkIndices", "dequants.0.cache", "prefill.q", … (a paged layer's "paged.q", …): run's buffers, in this order */
  readonly slots: string[];
  /**
   * Over one buffer per slot (each exactly the size of the one it stands for; all checked first,
   * throwing SMLA_ADDON_ARGUMENT before any launch), queues the dequants and the combine, allocates
   * the prefill's outputs (one stream-ordered allocation), queues the read of the combine's dropped
   * total into droppedInto (or none) and the prefill, all before it returns. A paged layer's
   * program (droppedInto null) allocates the outputs the same way and queues the paged op.
   */
  run(droppedInto: BigInt64Array | null, smScale: number, ...inputs: NativeDeviceBuffer[]): NativeLayerRun;
}

/** What a layer program's run queued. */
export interface NativeLayerRun {
  /**
   * Resolves once queued, or once the dropped total is in droppedInto (the prefill may still be
   * running); rejects with the first failure, when the caller frees the outputs.
   */
  done: Promise<void>;
  /** the prefill's outputs, views of one allocation at 256-byte boundaries; all null when run did not queue the whole layer (done then rejects) */
  out: NativeDeviceBuffer | null;
  maxLogits: NativeDeviceBuffer | null;
  lse: NativeDeviceBuffer | null;
}

export interface CudaDeviceInfo {
  index: number;
  name: string;
  computeCapability: string;
  multiProcessors: number;
  memoryBytes: number;
  l2Bytes: number;
  /** peerAccess[j]: this device reads and writes device j's memory directly */
  peerAccess: boolean[];
}

export interface CudaDeviceQuery {
  count: number;
  /** "cudaErrorX: message" when cudaGetDeviceCount failed (no driver, no device) */
  error: string | null;
  runtimeVersion: number;
  /** 0 when no driver is installed */
  driverVersion: number;
  devices: CudaDeviceInfo[];
}

export type NativeCudaInfo =
  | { built: false }
  | {
      built: true;
      compilerVersion: string;
      arch: string;
      /** the native/cuda kernels are linked in */
      kernels: boolean;
      devices(): CudaDeviceQuery;
      /** the op launchers (absent in an addon built before they existed) */
      ops?: NativeCudaOps;
    };

export interface NativeAddon {
  abiVersion: number;
  /** sources: the fingerprint of the sources it was built from ('' or absent: not recorded) */
  build: { cpuArch: string; simd: string; hardwareThreads: number; sources?: string };
  cpu: NativeCpuOps;
  cuda: NativeCudaInfo;
}

/** Where the loaded addon came from. */
export type AddonOrigin = AddonCandidate['origin'];

export type AddonLoad =
  | {
      ok: true;
      addon: NativeAddon;
      path: string;
      origin: AddonOrigin;
      /** the prebuilt CPU level (x86-64-v3 / x86-64-v2) */
      level?: string;
      /** why this addon has no CUDA kernels (when it has none), from its manifest or the install */
      cudaWhyNot: string;
      install: InstallStatus | null;
    }
  | { ok: false; reason: string; path: string; install: InstallStatus | null };


/**
 * The addon at path, or why it cannot be used. `sources` (a source build): the fingerprint of the
 * sources here, which the addon must have been built from.
 */
function tryLoad(path: string, sources: string | null): { ok: true; addon: NativeAddon } | { ok: false; why: string } {
  // a FIFO or a device (SPARSE_MLA_NATIVE_ADDON=/dev/zero) would block the loader's read forever
  let stat: ReturnType<typeof statSync>;
  try {
    stat = statSync(path, { throwIfNoEntry: false });
  } catch (e) {
    return { ok: false, why: `${path} cannot be read (${(e as Error).message.split('\n')[0]})` };
  }
  if (stat === undefined) return { ok: false, why: `${path} is missing` };
  if (!stat.isFile()) return { ok: false, why: `${path} is not a regular file` };
  let addon: NativeAddon;
  try {
    addon = createRequire(import.meta.url)(path) as NativeAddon;
  } catch (e) {
    return { ok: false, why: `${path} failed to load (${(e as Error).message.split('\n')[0]})` };
  }
  if (addon?.abiVersion !== ABI_VERSION) return { ok: false, why: `${path} has ABI version ${String(addon?.abiVersion)}, not ${ABI_VERSION} (a stale build)` };
  const missing = CPU_OPS.filter((op) => typeof addon.cpu?.[op] !== 'function');
  if (missing.length > 0 || typeof addon.cuda?.built !== 'boolean') return { ok: false, why: `${path} lacks ${missing.join(', ') || 'cuda'} (a stale build)` };
  // Same ABI and op names do not make the same contract (an op's arguments, which memory it
  // writes and when): a build that predates the sources here is not used.
  if (sources !== null && addon.build?.sources !== sources) {
    const built = addon.build?.sources ? `sources ${addon.build.sources}` : 'no record of its sources';
    return { ok: false, why: `${path} was not built from the native sources here (it has ${built}, these are ${sources}): a stale build from before a change to cpp/ or native/` };
  }
  return { ok: true, addon };
}

/** What the install recorded about a failed or skipped source build, for messages. */
function installNote(install: InstallStatus | null): string | null {
  if (!install) return null;
  const b = install.build;
  if (b?.ran && b.result === 'failed') {
    const first = b.excerpt?.[0];
    return `the source build at install failed (${b.problem}${b.log ? `; log: ${b.log}` : ''}${first ? `; ${first.trim()}` : ''})`;
  }
  if (b && !b.ran && install.addon !== 'prebuilt') return `no source build at install: ${b.why}`;
  if (install.addon === 'none' && install.reason) return `install: ${install.reason}`;
  return null;
}

/** Why there is no addon: each candidate's problem, what the install recorded, how to get one. */
function noAddonReason(candidates: AddonCandidate[], failures: string[], prebuilt: PrebuiltChoice, install: InstallStatus | null): string {
  if (candidates.length === 1 && candidates[0]!.origin === 'env') return `addon not built (${failures[0]}; ${ADDON_PATH_ENV} points there): ${HOW_TO_BUILD}`;
  const parts: string[] = [];
  if (!prebuilt.ok) parts.push(`no prebuilt addon: ${prebuilt.why}`);
  parts.push(...failures.filter((f) => !(f.endsWith(' is missing') && f.startsWith(SOURCE_BUILD_ADDON))));
  const note = installNote(install);
  if (note) parts.push(note);
  else if (!install) parts.push('the install script did not run (npm --ignore-scripts, or pnpm without approving its build script)');
  if (!existsSync(SOURCE_BUILD_ADDON) && !note) parts.push(`not built here (${SOURCE_BUILD_ADDON} is missing)`);
  return `addon not available (${parts.join('; ')}): ${HOW_TO_BUILD}`;
}

/** Why the loaded addon has no CUDA kernels: its manifest, or what its build recorded. */
function cudaWhyNot(candidate: AddonCandidate, prebuilt: PrebuiltChoice, install: InstallStatus | null): string {
  if (candidate.origin === 'prebuilt' && prebuilt.ok) {
    const c = prebuilt.manifest.cuda;
    return c && !c.built && c.why ? c.why : 'the prebuilt addon was packed without CUDA';
  }
  if (candidate.origin === 'source build' && install?.addon === 'built' && install.cuda && !install.cuda.built && install.cuda.why) return install.cuda.why;
  return `the addon at ${candidate.path} was built without CUDA`;
}

function load(env: NodeJS.ProcessEnv): AddonLoad {
  const install = env[ADDON_PATH_ENV] ? null : readInstallStatus();
  const prebuilt = env[ADDON_PATH_ENV] ? ({ ok: false, why: `${ADDON_PATH_ENV} is set` } as const) : selectPrebuilt();
  const candidates = addonCandidates({ env, status: install, prebuilt });
  const failures: string[] = [];
  for (const c of candidates) {
    const r = tryLoad(c.path, c.origin === 'source build' ? addonSourceFingerprint() : null);
    if (r.ok) return { ok: true, addon: r.addon, path: c.path, origin: c.origin, ...(c.level ? { level: c.level } : {}), cudaWhyNot: cudaWhyNot(c, prebuilt, install), install };
    failures.push(r.why);
  }
  return { ok: false, path: candidates[0]?.path ?? SOURCE_BUILD_ADDON, reason: noAddonReason(candidates, failures, prebuilt, install), install };
}

let loaded: AddonLoad | null = null;

/** The addon, loaded once per process (a dlopen cannot be undone, so neither is a failure). */
export function loadNativeAddon(): AddonLoad {
  loaded ??= load(process.env);
  return loaded;
}

let cudaQuery: CudaDeviceQuery | null = null;

/** The CUDA device query, once per process (the runtime's first call is slow on GPU hosts). */
export function queryCudaDevices(addon: NativeAddon): CudaDeviceQuery | null {
  if (!addon.cuda.built) return null;
  cudaQuery ??= addon.cuda.devices();
  return cudaQuery;
}

export const CACHE_FORMAT_CODE = { v4: 0, v32: 1 } as const;
export const ROWS_DTYPE_CODE = { float32: 0, bf16: 1 } as const;

/**
 * An addon error → SparseMlaError naming the backend, the op and the status: BACKEND_FAILURE (a
 * thread that could not be started included), or TOO_LARGE (no memory for the call: its input
 * copies or the addon's own allocations) or INVALID_VALUE (the caller detached a
 * buffer the op writes while it ran), or DISPOSED (a queued cpu call its engine's dispose() cancelled).
 */
export function addonFailure(backend: 'cpu' | 'cuda', op: string, e: unknown): SparseMlaError {
  if (e instanceof SparseMlaError) return e;
  const x = e as { code?: string; status?: string; message?: string };
  if (x.code === 'SMLA_CANCELLED') return disposedError();
  if (x.code === 'SMLA_OUT_OF_MEMORY') return new SparseMlaError('TOO_LARGE', `${backend} backend: ${op}: ${x.message}`, op);
  if (x.code === 'SMLA_DETACHED') return new SparseMlaError('INVALID_VALUE', `${backend} backend: ${x.message}`, op === 'quantizeKCache' ? 'cache.data' : op);
  const what =
    x.code === 'SMLA_CORE_STATUS' ? `the core returned ${x.status}` : x.code === 'SMLA_CUDA_ERROR' ? `CUDA error ${x.status}` : (x.message ?? String(e));
  return new SparseMlaError('BACKEND_FAILURE', `${backend} backend: ${op} failed: ${what}`, op);
}
