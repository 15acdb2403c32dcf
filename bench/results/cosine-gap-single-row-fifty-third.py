import numpy as np
rng=np.random.default_rng(1)
def bf16(x):
    x=np.asarray(x,dtype=np.float32); b=x.view(np.uint32).astype(np.uint64)
    r=((b+0x7FFF+((b>>16)&1))>>16)<<16
    return r.astype(np.uint32).view(np.float32)
def trial(k,scale):
    v=bf16(rng.standard_normal((k,512)).astype(np.float32))
    s=rng.standard_normal(k)*scale
    w=np.exp(s-s.max()); ref=(w[:,None]*v.astype(np.float64)).sum(0)/w.sum()
    p=bf16(np.exp((s-s.max()).astype(np.float32)))   # P rounded to bf16 before P.V
    acc=(p[:,None].astype(np.float32)*v).sum(0,dtype=np.float32)
    got=bf16(acc/np.float32(np.exp((s-s.max()).astype(np.float32)).sum()))  # sum of unrounded P
    got=got.astype(np.float64)
    cos=2*(got@ref)/(got@got+ref@ref); return 1-cos
for k in (2,3,4,8,64):
  for scale in (1,3):
    g=np.array([trial(k,scale) for _ in range(2000)])
    print(f"k={k:3} scale={scale}: median {np.median(g):.2e}  p99 {np.quantile(g,0.99):.2e}  max {g.max():.2e}  frac>7e-6 {np.mean(g>7e-6):.4f}")
