// The cpu thread benches' call (terminate_wall.mjs, pool_readfile.mjs): one sparsePrefill of sQ queries,
// hQ 16, topk 512 over 3000 kv rows, every input in a SharedArrayBuffer (read in place by the addon, so the
// call's own cost is the attention, not copies), from a fixed seed.
export async function sharedPrefillArgs(dist, sQ) {
  const { tensor } = await import(`${dist}index.js`);
  const { makeRng, randomBf16Bits, randomIndices } = await import(`${dist}check/grid.js`);
  const rng = makeRng(1);
  const hQ = 16, sKV = 3000, topk = 512;
  const shared = (x) => {
    const s = new x.constructor(new SharedArrayBuffer(x.byteLength));
    s.set(x);
    return s;
  };
  return {
    q: tensor('bf16', [sQ, hQ, 512], shared(randomBf16Bits(rng, sQ * hQ * 512))),
    kv: tensor('bf16', [sKV, 512], shared(randomBf16Bits(rng, sKV * 512))),
    indices: tensor('int32', [sQ, topk], shared(randomIndices(rng, sQ, topk, sKV, 0, 0, []))),
    smScale: 0.05,
  };
}
