/** File formats: NumPy .npy, .safetensors, and the sparse-prefill directory used by `prefill` / `verify`. */
export * from './npy.js';
export * from './safetensors.js';
export * from './prefill_dir.js';
