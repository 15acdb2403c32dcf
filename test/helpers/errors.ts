/**
 * How the tests take hold of an error: the value a call throws or rejects with, and the
 * SparseMlaError a refusal must be (anything else fails the test where it is read).
 */
import { expect } from 'vitest';
import { SparseMlaError } from '../../dist/index.js';

/** The error a call throws or rejects with (undefined when it returns). */
export async function errorOf(call: () => unknown): Promise<unknown> {
  try {
    await call();
  } catch (e) {
    return e;
  }
  return undefined;
}

/** What a synchronous check gives: its result, or the SparseMlaError it throws (anything else fails the test). */
export function outcomeOf(check: () => unknown): { call?: unknown; error?: { code: string; message: string } } {
  try {
    return { call: check() };
  } catch (e) {
    expect(e).toBeInstanceOf(SparseMlaError);
    return { error: { code: (e as SparseMlaError).code, message: (e as SparseMlaError).message } };
  }
}

/** The SparseMlaError a call throws or rejects with (anything else, or no error, fails the test). */
export async function refusal(call: () => unknown): Promise<SparseMlaError> {
  const e = await errorOf(call);
  expect(e).toBeInstanceOf(SparseMlaError);
  return e as SparseMlaError;
}

/** The SparseMlaError a synchronous call throws, as [code, argument, message] (anything else, or no error, fails the test). */
export function refusalOf(call: () => unknown): [string, string | undefined, string] {
  let e: unknown;
  try {
    call();
  } catch (x) {
    e = x;
  }
  expect(e).toBeInstanceOf(SparseMlaError);
  const s = e as SparseMlaError;
  return [s.code, s.argument, s.message];
}
