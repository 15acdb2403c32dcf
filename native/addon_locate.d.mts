// Types of addon_locate.mjs (imported by src/backends/native/binding.ts).

export declare const PACKAGE_ROOT: string;
export declare const ADDON_NAME: string;
export declare const SOURCE_BUILD_DIR: string;
export declare const SOURCE_BUILD_ADDON: string;
export declare const SOURCE_BUILD_LOG: string;
export declare const INSTALL_STATUS_FILE: string;
export declare const PREBUILDS_DIR: string;
export declare const MANIFEST_NAME: string;
export declare const ADDON_PATH_ENV: 'SPARSE_MLA_NATIVE_ADDON';
export declare const BUILD_FROM_SOURCE_ENV: 'SPARSE_MLA_BUILD_FROM_SOURCE';
/** Per platform (`linux-x64`, `linux-arm64`): the prebuilt CPU levels, best first, and whether they carry the CUDA kernels. */
export declare const PREBUILT_TARGETS: Readonly<Record<string, { readonly levels: readonly string[]; readonly cuda: boolean }>>;
export declare const LEVEL_FLAGS: Readonly<Record<string, readonly string[]>>;

export declare function platformKey(platform?: string, arch?: string): string;
export declare function isTruthyEnv(value: string | undefined): boolean;
export declare function isCheckout(root?: string): boolean;
export declare function howToBuild(root?: string): string;
export declare function readCpuFlags(cpuinfo?: string): Set<string> | null;
export declare function missingFlags(level: string, flags: Set<string>): string[];
export declare function readJson(path: string): unknown;
export declare const ADDON_SOURCE_DIRS: readonly string[];
/** A hash of the sources compiled into the addon, or null where there are none. */
export declare function addonSourceFingerprint(root?: string): string | null;

/** CUDA in an addon: built, or why not. */
export type CudaBuild = { built: true; arch?: string; nvcc?: string; runtime?: string } | { built: false; why?: string };

/** prebuilds/<platform>/manifest.json, written by native/prebuild.mjs. */
export interface PrebuiltManifest {
  package: string;
  version: string;
  platform: string;
  builtAt: string;
  commit: string | null;
  compiler: string;
  nodeApi: number;
  /** the newest glibc symbol version the addons need */
  glibc: string | null;
  /** the newest libstdc++ symbol version (GLIBCXX_) the addons need */
  glibcxx?: string | null;
  cuda: CudaBuild;
  addons: { file: string; cpuArch: string; simd: string; bytes: number; sha256: string }[];
}

/** build/install-status.json, written by native/install.mjs. */
export interface InstallStatus {
  schema: number;
  package?: string | null;
  time: string;
  platform: string;
  node: string;
  root: string;
  /** what the install set up: the package's prebuilt addon, one built here, or none */
  addon: 'prebuilt' | 'built' | 'none';
  path: string | null;
  cpuArch?: string;
  simd?: string;
  cuda?: CudaBuild;
  /** why there is no addon (addon 'none') */
  reason?: string;
  prebuilt?: { ok: boolean; path?: string; level?: string; why?: string };
  build?: {
    ran: boolean;
    why: string;
    result?: 'ok' | 'failed';
    problem?: string;
    cpuArch?: string;
    withCuda?: string;
    seconds?: number;
    log?: string | null;
    addon?: string;
    excerpt?: string[];
  };
}

export declare function readInstallStatus(path?: string): InstallStatus | null;

export type PrebuiltChoice =
  | { ok: true; path: string; level: string; manifest: PrebuiltManifest; entry: PrebuiltManifest['addons'][number] }
  | { ok: false; why: string };

export declare function selectPrebuilt(options?: { root?: string; platform?: string; arch?: string; cpuinfo?: string }): PrebuiltChoice;

export interface AddonCandidate {
  path: string;
  origin: 'env' | 'source build' | 'prebuilt';
  level?: string;
}

export declare function addonCandidates(options?: {
  env?: NodeJS.ProcessEnv;
  root?: string;
  status?: InstallStatus | null;
  prebuilt?: PrebuiltChoice;
}): AddonCandidate[];
