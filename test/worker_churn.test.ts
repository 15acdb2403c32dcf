/**
 * SPEC §9 (nothing may leak per call): a cpu call still pending when its user Worker is terminated
 * leaves nothing behind. Workers are started one after another in a child
 * (test/children/worker_churn.mjs), each queues thousands of small cpu calls of the native addon
 * and is terminated while all of them are pending; the child's anonymous resident memory must stay
 * flat.
 *
 * The leak it guards against: a promise made through a napi_deferred, which Node frees only when it
 * settles it and cannot settle once the Worker's JS has stopped, leaves one 32-byte block a pending
 * call (native/addon/errors_and_promises.cpp settles its promises through references to resolve / reject instead,
 * which teardown frees). The figures before and after: bench/results/house-fifty-fifth-worker-churn.txt.
 */
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { describe, expect, test } from 'vitest';
import { nativeAddonBuilt } from './helpers/backends.js';
import { median } from './helpers/growth.js';

const MiB = 2 ** 20;
const child = fileURLToPath(new URL('./children/worker_churn.mjs', import.meta.url));

describe.skipIf(!nativeAddonBuilt() || process.platform !== 'linux')('user Workers terminated with cpu calls pending', () => {
  test('100 Workers of 4,000 pending calls each: the anonymous resident memory stays flat (no block left per call)', () => {
    const rounds = 100, calls = 4000, every = 10;
    const p = spawnSync(process.execPath, ['--expose-gc', child, String(rounds), String(calls), String(every)], { encoding: 'utf8', timeout: 120_000 });
    expect({ signal: p.signal, status: p.status, stderr: p.stderr }).toEqual({ signal: null, status: 0, stderr: '' });
    const { samples } = JSON.parse(p.stdout) as { samples: number[] };
    expect(samples).toHaveLength(rounds / every);
    // rounds 10-30 against rounds 80-100, 280,000 calls apart. A block left per call grows the memory
    // by its 32 bytes and the allocator's header every call; what moves without a leak (the allocator
    // keeping or returning freed pages) does not grow with the calls, so spread over this many it is a
    // small share of a block. 12 bytes a call, under half a block, leaves room for that and none for a block a call.
    const growth = (median(samples.slice(-3)) - median(samples.slice(0, 3))) * MiB;
    const callsBetween = (samples.length - 3) * every * calls;
    expect(growth / callsBetween).toBeLessThan(12);
  }, 130_000);
});
