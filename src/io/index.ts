/** File formats: NumPy .npy, .safetensors, and the sparse-prefill directory used by `prefill` / `verify`; safe file access. */
export * from './npy.js';
export * from './safetensors.js';
export * from './prefill_dir.js';
export { clip, prepareOutputDir, prepareOutputFile, writeFileNoFollow } from './files.js';
