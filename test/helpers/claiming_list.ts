/**
 * Lists that count what the library reads of them, for the "count before content" tests: a refusal
 * that needs only a list's length must come before any element is read.
 */

/** How often a counted list answered its length and its elements (all together). */
export interface ListReads {
  length: number;
  elements: number;
}

/** Counts one read of `key` (its length or an element; other keys are not counted), also by key. */
function counting(reads: ListReads, byKey: Map<string, number>, key: PropertyKey, readBudget: number): void {
  if (typeof key !== 'string') return;
  if (key === 'length') reads.length++;
  else if (/^\d+$/.test(key)) {
    if (++reads.elements > readBudget) throw new Error(`counted list: more than ${readBudget} elements read`);
  } else return;
  byKey.set(key, (byKey.get(key) ?? 0) + 1);
}

/**
 * A Proxy of an array claiming `length` elements, each `value`. `readBudget`: element reads it answers
 * before it throws a plain Error, so a path that reads everything stops at once instead of taking the
 * seconds a real list of that length would.
 */
export function claimingList(length: number, value: unknown, readBudget = Infinity): { list: unknown[]; reads: ListReads; byKey: Map<string, number> } {
  const reads: ListReads = { length: 0, elements: 0 }, byKey = new Map<string, number>();
  const list = new Proxy([] as unknown[], {
    get(target, key, receiver) {
      counting(reads, byKey, key, readBudget);
      if (key === 'length') return length;
      if (typeof key === 'string' && /^\d+$/.test(key)) return value;
      return Reflect.get(target, key, receiver);
    },
  });
  return { list, reads, byKey };
}

/** A Proxy over a real array that counts the reads of its length and elements. */
export function countedArray<T>(values: T[]): { list: T[]; reads: ListReads; byKey: Map<string, number> } {
  const reads: ListReads = { length: 0, elements: 0 }, byKey = new Map<string, number>();
  const list = new Proxy(values, {
    get(target, key, receiver) {
      counting(reads, byKey, key, Infinity);
      return Reflect.get(target, key, receiver);
    },
  });
  return { list, reads, byKey };
}
