/**
 * Reference codecs for SPEC §2 (bf16, e4m3fn, ue8m0), the math in codecs.ts: each refuses what is
 * not in its domain (a value that is no number, a bit pattern that is no integer of its range) with
 * INVALID_VALUE, since bit operations would coerce it into some other value, silently. NaN and
 * ±inf are values of these formats' math and pass.
 */
import * as C from './codecs.js';
import { describeValue, refuse } from './checks.js';

export { BF16_MAX, E4M3_MAX } from './codecs.js';

/** x must be a number (any: NaN and ±inf included). */
function number(x: unknown, argument: string): void {
  if (typeof x !== 'number') refuse('INVALID_VALUE', argument, 'a number', describeValue(x));
}

/** bits must be an integer in [0, mask] (a bf16 pattern, an FP8 byte). */
function bitPattern(bits: unknown, mask: number, argument: string): void {
  if (typeof bits !== 'number' || (bits & mask) !== bits) refuse('INVALID_VALUE', argument, `an integer in [0, ${mask}]`, describeValue(bits));
}

/** True when x carries a sign bit (including -0 and a NaN whose sign bit is set in float64). */
export function signBit(x: number): boolean {
  number(x, 'x');
  return C.signBit(x);
}

/** floor(log2(|x|)) for a finite, non-zero float64, exactly (read from the exponent field). */
export function exponentOf(x: number): number {
  // 0 recursed without end (its exponent field is that of a subnormal, scaled up forever)
  if (typeof x !== 'number' || x === 0 || !Number.isFinite(x)) refuse('INVALID_VALUE', 'x', 'a finite, non-zero number', describeValue(x));
  return C.exponentOf(x);
}

/** Round x (exactly representable as a float64) to the nearest integer, ties to even. */
export function roundHalfEven(x: number): number {
  number(x, 'x');
  return C.roundHalfEven(x);
}

/** float64 -> bf16 bit pattern: round to nearest even, overflow to ±inf, NaN stays NaN (0x7FC0|sign). */
export function encodeBf16(x: number): number {
  number(x, 'x');
  return C.encodeBf16(x);
}

/** bf16 bit pattern -> float64 value (exact). */
export function decodeBf16(bits: number): number {
  bitPattern(bits, 0xffff, 'bits');
  return C.decodeBf16(bits);
}

/** Round a float64 to the nearest bf16 value (as a number). */
export function roundToBf16(x: number): number {
  number(x, 'x');
  return C.roundToBf16(x);
}

/**
 * float64 -> e4m3fn byte. Clamp to ±448 first (so ±inf and anything larger saturate), then round
 * to nearest even; NaN -> 0x7F with the sign of the input; subnormals down to 2^-9.
 */
export function encodeE4m3(x: number): number {
  number(x, 'x');
  return C.encodeE4m3(x);
}

/** e4m3fn byte -> float64 value (exact); 0x7F/0xFF are NaN. */
export function decodeE4m3(byte: number): number {
  bitPattern(byte, 0xff, 'byte');
  return C.decodeE4m3(byte);
}

/** ue8m0 byte -> 2^(byte - 127); 0xFF is NaN. */
export function decodeUe8m0(byte: number): number {
  bitPattern(byte, 0xff, 'byte');
  return C.decodeUe8m0(byte);
}

/** The ue8m0 byte of 2^e (e in [-127, 127]; an integer outside is clamped to 0 or 254). */
export function encodeUe8m0(e: number): number {
  if (typeof e !== 'number' || !Number.isInteger(e)) refuse('INVALID_VALUE', 'e', 'an integer', describeValue(e));
  return C.encodeUe8m0(e);
}

/** Round a float64 to float32 (RNE; overflow to ±inf), as the reference's model of a float32 step. */
export function roundToFloat32(x: number): number {
  number(x, 'x');
  return C.roundToFloat32(x);
}
