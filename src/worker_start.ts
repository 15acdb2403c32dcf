/** Starting the package's worker threads from their files. */
import { Worker, type WorkerOptions } from 'node:worker_threads';

/**
 * A worker running the module at `url`. Under --input-type (`node --input-type=module -e …`, or a
 * module piped to stdin), which workers inherit, Node 20 refuses to start a worker from a file, so
 * there the worker imports the file from an eval'd import() (an explicit execArgv without the flag
 * would instead refuse per-process flags such as --max-old-space-size).
 */
export function startWorker(url: URL, options: Omit<WorkerOptions, 'eval'>): Worker {
  const inputType = process.execArgv.some((a) => a === '--input-type' || a.startsWith('--input-type='));
  return inputType ? new Worker(`import(${JSON.stringify(url.href)});`, { ...options, eval: true }) : new Worker(url, options);
}
