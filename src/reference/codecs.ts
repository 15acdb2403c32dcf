/**
 * The codecs of SPEC §2 as the reference's own loops run them, on values they produced or checked
 * (no argument checks: formats.ts wraps each for the public subpath). Written from the SPEC in
 * float64 arithmetic (no bit tricks on the float32 encoding): bf16, e4m3fn (OCP FP8) and ue8m0.
 * Every encoder rounds once, to nearest even, directly from the float64 value it is given.
 */

const f64 = new Float64Array(1);
const u64 = new BigUint64Array(f64.buffer);

/** True when x carries a sign bit (including -0 and a NaN whose sign bit is set in float64). */
export function signBit(x: number): boolean {
  f64[0] = x;
  return (u64[0]! >> 63n) === 1n;
}

/** floor(log2(|x|)) for a finite, non-zero float64, exactly (read from the exponent field). */
export function exponentOf(x: number): number {
  f64[0] = x;
  const biased = Number((u64[0]! >> 52n) & 0x7ffn);
  if (biased !== 0) return biased - 1023;
  // float64 subnormal: scale into the normal range first
  return exponentOf(x * 2 ** 64) - 64;
}

/** Round x (exactly representable as a float64) to the nearest integer, ties to even. */
export function roundHalfEven(x: number): number {
  const n = Math.floor(x);
  const frac = x - n;
  if (frac > 0.5) return n + 1;
  if (frac < 0.5) return n;
  return n % 2 === 0 ? n : n + 1;
}

/**
 * Round |x| to a binary format with `mantissaBits` stored fraction bits whose smallest normal
 * exponent is `minExp`: quantum = 2^(max(floor(log2|x|), minExp) - mantissaBits). Returns the
 * rounded magnitude (may step up into the next binade, or past the largest finite value).
 */
function roundMagnitude(mag: number, mantissaBits: number, minExp: number): number {
  if (mag === 0) return 0;
  const e = Math.max(exponentOf(mag), minExp);
  const quantum = 2 ** (e - mantissaBits);
  return roundHalfEven(mag / quantum) * quantum;
}

// ---------------------------------------------------------------- bf16

export const BF16_MAX = (2 - 2 ** -7) * 2 ** 127;

/** float64 -> bf16 bit pattern: round to nearest even, overflow to ±inf, NaN stays NaN (0x7FC0|sign). */
export function encodeBf16(x: number): number {
  const sign = signBit(x) ? 0x8000 : 0;
  if (Number.isNaN(x)) return sign | 0x7fc0;
  if (!Number.isFinite(x)) return sign | 0x7f80;
  const r = roundMagnitude(Math.abs(x), 7, -126);
  if (r >= 2 ** 128) return sign | 0x7f80;
  if (r === 0) return sign;
  if (r < 2 ** -126) return sign | (r / 2 ** -133); // subnormal: exponent field 0
  const e = exponentOf(r);
  return sign | ((e + 127) << 7) | (r / 2 ** e * 128 - 128);
}

/** bf16 bit pattern -> float64 value (exact). */
export function decodeBf16(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exp = (bits >> 7) & 0xff;
  const mant = bits & 0x7f;
  if (exp === 0xff) return mant === 0 ? sign * Infinity : NaN;
  if (exp === 0) return sign * mant * 2 ** -133;
  return sign * (128 + mant) * 2 ** (exp - 134);
}

/** Round a float64 to the nearest bf16 value (as a number). */
export function roundToBf16(x: number): number {
  return decodeBf16(encodeBf16(x));
}

// ---------------------------------------------------------------- e4m3fn

export const E4M3_MAX = 448;

/**
 * float64 -> e4m3fn byte. Clamp to ±448 first (so ±inf and anything larger saturate), then round
 * to nearest even; NaN -> 0x7F with the sign of the input; subnormals down to 2^-9.
 */
export function encodeE4m3(x: number): number {
  const sign = signBit(x) ? 0x80 : 0;
  if (Number.isNaN(x)) return sign | 0x7f;
  const mag = Math.min(Math.abs(x), E4M3_MAX);
  const r = roundMagnitude(mag, 3, -6);
  if (r === 0) return sign;
  if (r < 2 ** -6) return sign | (r / 2 ** -9); // subnormal: exponent field 0
  const e = exponentOf(r);
  const mant = r / 2 ** e * 8 - 8;
  return sign | ((e + 7) << 3) | mant;
}

/** e4m3fn byte -> float64 value (exact); 0x7F/0xFF are NaN. */
export function decodeE4m3(byte: number): number {
  const sign = byte & 0x80 ? -1 : 1;
  const exp = (byte >> 3) & 0xf;
  const mant = byte & 7;
  if (exp === 15 && mant === 7) return NaN;
  if (exp === 0) return sign * mant * 2 ** -9;
  return sign * (8 + mant) * 2 ** (exp - 10);
}

// ---------------------------------------------------------------- ue8m0

/** ue8m0 byte -> 2^(byte - 127); 0xFF is NaN. */
export function decodeUe8m0(byte: number): number {
  if (byte === 0xff) return NaN;
  return 2 ** (byte - 127);
}

/** The ue8m0 byte of 2^e (e in [-127, 127]). */
export function encodeUe8m0(e: number): number {
  return Math.min(Math.max(e + 127, 0), 254);
}

// ---------------------------------------------------------------- float32

/** Round a float64 to float32 (RNE; overflow to ±inf), as the reference's model of a float32 step. */
export function roundToFloat32(x: number): number {
  return Math.fround(x);
}
