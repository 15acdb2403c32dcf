#!/usr/bin/env bash
# The package as an npm user gets it: pack it (prepack builds the prebuilt addons: linux-x64, and
# linux-arm64 with the cross compiler g++-aarch64-linux-gnu, which must be here), install the
# tarball into an empty project whose PATH holds node, npm and sh only (no CMake, no compiler, no
# nvcc), and there require: `sparse-mla info --json` reports the prebuilt addon with `cpu`
# available (and CUDA built when nvcc was here to pack it); the check grid passes on both prebuilt
# CPU levels; every ```js block of the README and every file in examples/ runs; require('sparse-mla')
# works. Then a source build from the package (SPARSE_MLA_BUILD_FROM_SOURCE=1, with the
# toolchain) must build and load.
# Run from the repository root after `npm ci`.
set -euo pipefail
root=$(pwd)
work=$(mktemp -d)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
fail() { echo "package check: $*" >&2; exit 1; }
# no absolute path of the tree an addon was built in (nvcc's device line info names its sources by
# them; native/build_tools.mjs scrubBuildTree rewrites them): no_build_paths <tree> <addon>...
no_build_paths() {
  local tree=$1 real n f
  real=$(readlink -f "$tree")
  shift
  for f in "$@"; do
    n=$({ grep -a -o -F -e "$tree" -e "$real" "$f" || true; } | wc -l)
    [ "$n" = 0 ] || fail "${f#"$work"/} holds $n absolute paths of the tree it was built in ($tree)"
  done
  echo "no path of the build tree in: $(for f in "$@"; do basename "$f"; done | tr '\n' ' ')"
}

have_nvcc=$(command -v nvcc >/dev/null 2>&1 && echo 1 || echo 0)
pack_cuda=$([ "$have_nvcc" = 1 ] && echo ON || echo OFF)
[ "$pack_cuda" = ON ] || echo "package check: no nvcc here, so the package is packed without the CUDA kernels (a release needs nvcc)"
# SPARSE_MLA_PACK_ARM64=OFF (no cross compiler here) packs and checks the package without the
# linux-arm64 addon: not a release, and said so, but every other check runs
pack_arm64=$(echo "${SPARSE_MLA_PACK_ARM64:-ON}" | tr '[:lower:]' '[:upper:]')
[ "$pack_arm64" = ON ] || [ "$pack_arm64" = OFF ] || fail "SPARSE_MLA_PACK_ARM64: expected ON or OFF, got '$SPARSE_MLA_PACK_ARM64'"
[ "$pack_arm64" = ON ] || echo "package check: SPARSE_MLA_PACK_ARM64=$SPARSE_MLA_PACK_ARM64, so the package is packed and checked without the linux-arm64 addon (a release needs it)"

# ---- pack
SPARSE_MLA_PACK_CUDA=$pack_cuda npm pack --pack-destination "$work" > "$work/pack.log" 2>&1 || { cat "$work/pack.log"; fail "npm pack failed"; }
tarball=$(ls "$work"/sparse-mla-*.tgz)
grep -E "prebuild|package size|unpacked size|total files" "$work/pack.log" || true
tar tzf "$tarball" | sort > "$work/files.txt"
grep -qx 'package/prebuilds/linux-x64/manifest.json' "$work/files.txt" || fail "the tarball has no prebuilt addon"
if [ "$pack_arm64" = ON ]; then
  grep -qx 'package/prebuilds/linux-arm64/manifest.json' "$work/files.txt" || fail "the tarball has no linux-arm64 prebuilt addon"
fi
grep -q '^package/test/' "$work/files.txt" && fail "the tarball carries test/"
mkdir -p "$work/unpacked"
tar xzf "$tarball" -C "$work/unpacked"
node -e '
  const fs = require("fs"), path = require("path");
  const root = process.argv[1];
  const maps = fs.readdirSync(root, { recursive: true }).filter((f) => f.endsWith(".js.map"));
  const bad = [];
  for (const m of maps) for (const s of JSON.parse(fs.readFileSync(path.join(root, m), "utf8")).sources) {
    if (!fs.existsSync(path.resolve(root, path.dirname(m), s))) bad.push(`${m} -> ${s}`);
  }
  if (bad.length) { console.error(`source maps pointing at files not in the tarball:\n${bad.join("\n")}`); process.exit(1); }
' "$work/unpacked/package" || fail "stale source maps"
echo "tarball: $(basename "$tarball"), $(du -k "$tarball" | cut -f1) KiB, $(wc -l < "$work/files.txt") files, source maps resolve"
no_build_paths "$root" "$work"/unpacked/package/prebuilds/*/*.node

# Builds of one commit do not depend on where the tree is: the packed x86-64-v2 addon, rebuilt from
# the unpacked tarball (another path, of another length) as prebuild.mjs built it, has its bytes
ln -s "$root/node_modules" "$work/unpacked/node_modules"
node --input-type=module -e '
  import { readFileSync } from "node:fs";
  import { join } from "node:path";
  import { pathToFileURL } from "node:url";
  const [pkg, withCuda] = process.argv.slice(1);
  const { buildAddon, findBuildTools } = await import(pathToFileURL(join(pkg, "native", "build_tools.mjs")).href);
  const tools = findBuildTools(pkg);
  if (!tools.ok) { console.error(tools.why); process.exit(1); }
  const outDir = join(pkg, "build", "rebuild-x86-64-v2");
  const r = await buildAddon({ root: pkg, cmakeJs: tools.cmakeJs, compilers: tools.compilers, outDir, cpuArch: "x86-64-v2", withCuda, portable: true, logPath: join(outDir, "build.log") });
  if (!r.ok || !r.scrub.ok) { console.error(`the rebuild ${r.problem ?? r.scrub.why} (log: ${join(outDir, "build.log")})`); process.exit(1); }
  const packed = readFileSync(join(pkg, "prebuilds", "linux-x64", "sparse_mla_native.x86-64-v2.node"));
  const rebuilt = readFileSync(r.addon);
  if (!packed.equals(rebuilt)) {
    let n = 0, first = -1;
    for (let i = 0; i < Math.max(packed.length, rebuilt.length); i++) if (packed[i] !== rebuilt[i]) { n++; if (first < 0) first = i; }
    console.error(`${n} bytes differ (${packed.length} vs ${rebuilt.length} bytes; the first at 0x${first.toString(16)}): cmp -l, readelf -S and strings of the two name what`);
    process.exit(1);
  }
  console.log(`the x86-64-v2 addon rebuilt from the unpacked tarball (CUDA ${withCuda}) has the packed bytes (${packed.length}), ${Math.round(r.seconds)} s`);
' "$work/unpacked/package" "$pack_cuda" || fail "the packed addon is not what its sources build at another path"

# The linux-arm64 addon cannot load on this machine (.ci/arm64_check.sh runs it emulated): each file
# its manifest lists is there with its checksum, is an AArch64 shared object exporting the Node-API
# entry point, links only system libraries and needs no newer glibc / libstdc++ than the x64 addons.
[ "$pack_arm64" = OFF ] || node --input-type=module -e '
  import { createHash } from "node:crypto";
  import { readFileSync } from "node:fs";
  import { join } from "node:path";
  import { pathToFileURL } from "node:url";
  const pkg = process.argv[1];
  const { inspectElf } = await import(pathToFileURL(join(pkg, "native", "build_tools.mjs")).href);
  const manifest = (p) => JSON.parse(readFileSync(join(pkg, "prebuilds", p, "manifest.json"), "utf8"));
  const x64 = manifest("linux-x64"), arm = manifest("linux-arm64");
  const newer = (a, b) => a.localeCompare(b, "en", { numeric: true }) > 0;
  const problems = [];
  if (arm.addons.length === 0) problems.push("the linux-arm64 manifest lists no addon");
  for (const a of arm.addons) {
    const file = join(pkg, "prebuilds", "linux-arm64", a.file);
    const bytes = readFileSync(file);
    if (createHash("sha256").update(bytes).digest("hex") !== a.sha256) problems.push(`${a.file}: sha256 differs from the manifest`);
    const elf = inspectElf(file);
    if (!elf.ok) { problems.push(`${a.file}: ${elf.why}`); continue; }
    if (elf.machine !== "AArch64" || elf.elfClass !== "ELF64" || elf.type !== "DYN") problems.push(`${a.file}: ${elf.elfClass} ${elf.type} for ${elf.machine}`);
    if (!elf.exportsNapiInit) problems.push(`${a.file}: no napi_register_module_v1`);
    const odd = elf.needed.filter((l) => !/^(libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s)\.so\.\d$|^ld-linux-aarch64\.so\.1$/.test(l));
    if (odd.length) problems.push(`${a.file}: links ${odd.join(", ")}`);
    if (newer(elf.glibc, x64.glibc) || newer(elf.glibcxx, x64.glibcxx ?? elf.glibcxx)) problems.push(`${a.file}: needs glibc ${elf.glibc} / GLIBCXX ${elf.glibcxx}, the x64 addons ${x64.glibc} / ${x64.glibcxx}`);
    if (elf.glibc !== arm.glibc) problems.push(`${a.file}: needs glibc ${elf.glibc}, its manifest says ${arm.glibc}`);
    console.log(`linux-arm64: ${a.file} ${a.cpuArch} ${a.simd}, ${(bytes.length / 2 ** 20).toFixed(2)} MiB, ${elf.machine}, glibc ${elf.glibc}, GLIBCXX ${elf.glibcxx}, cuda ${arm.cuda.built ? "built" : "none"}`);
  }
  if (problems.length) { console.error(problems.join("\n")); process.exit(1); }
' "$work/unpacked/package" || fail "the linux-arm64 prebuilt addon"

# `bin` must survive publishing (npm drops or rewrites fields it has to correct)
npm publish --dry-run --ignore-scripts > "$work/publish.log" 2>&1 || { cat "$work/publish.log"; fail "npm publish --dry-run failed"; }
if grep -qi "auto-corrected" "$work/publish.log"; then cat "$work/publish.log"; fail "npm publish corrects package.json"; fi

# ---- install into an empty project, with node, npm and sh only on PATH
bin="$work/bin"
mkdir -p "$bin"
ln -s "$(command -v node)" "$bin/node"
ln -s "$(readlink -f "$(command -v npm)")" "$bin/npm"
ln -s "$(command -v sh)" "$bin/sh"
for tool in cmake c++ g++ gcc cc clang++ nvcc make ninja; do
  if PATH=$bin command -v "$tool" >/dev/null 2>&1; then fail "$tool is on the restricted PATH"; fi
done
bare() { env -u CXX -u CC -u CMAKE -u CUDACXX PATH="$bin" "$@"; }

app="$work/app"
mkdir -p "$app"
cd "$app"
echo '{ "name": "app", "private": true, "type": "module" }' > package.json
bare npm install --no-audit --no-fund --foreground-scripts "$tarball"

echo; echo '$ npx sparse-mla info'
bare ./node_modules/.bin/sparse-mla info
bare ./node_modules/.bin/sparse-mla info --json > info.json
bare node -e '
  const info = JSON.parse(require("fs").readFileSync("info.json", "utf8"));
  const wantCuda = process.argv[1] === "ON";
  const cpu = info.backends.find((b) => b.name === "cpu");
  const problems = [];
  if (!cpu.available) problems.push(`cpu unavailable: ${cpu.reason}`);
  if (info.addon.origin !== "prebuilt") problems.push(`the addon loaded is not the prebuilt one: ${JSON.stringify(info.addon)}`);
  if (info.addon.install?.addon !== "prebuilt") problems.push(`the install did not choose the prebuilt addon: ${JSON.stringify(info.addon.install)}`);
  if (info.addon.cuda.built !== wantCuda) problems.push(`cuda built ${info.addon.cuda.built}, expected ${wantCuda}`);
  if (problems.length) { console.error(problems.join("\n")); process.exit(1); }
  console.log(`info --json: cpu available (${cpu.details.simd}, ${cpu.details.cpuArch}), cuda ${info.addon.cuda.built ? "built" : "not built"}, addon ${info.addon.path}`);
' "$pack_cuda" || fail "info --json in the empty project"

# both prebuilt CPU levels compute correctly (this CPU runs either): the check grid on each
for level in x86-64-v3 x86-64-v2; do
  addon="$app/node_modules/sparse-mla/prebuilds/linux-x64/sparse_mla_native.$level.node"
  echo; echo "\$ SPARSE_MLA_NATIVE_ADDON=<the $level addon> sparse-mla check --backend cpu --quiet"
  bare SPARSE_MLA_NATIVE_ADDON="$addon" ./node_modules/.bin/sparse-mla check --backend cpu --quiet || fail "the check grid on the prebuilt $level addon"
done

# every ```js block of the README, as written
bare node -e '
  const fs = require("fs");
  const text = fs.readFileSync("node_modules/sparse-mla/README.md", "utf8");
  const blocks = [...text.matchAll(/^```js\n([\s\S]*?)^```$/gm)].map((m) => m[1]);
  if (blocks.length === 0) { console.error("no js blocks in the README"); process.exit(1); }
  blocks.forEach((b, i) => fs.writeFileSync(`readme_${i + 1}.mjs`, b));
  console.log(`${blocks.length} README js blocks`);
'
for f in readme_*.mjs node_modules/sparse-mla/examples/*.mjs; do
  echo; echo "\$ node $f"
  timeout 600 env -u CXX -u CC -u CMAKE -u CUDACXX PATH="$bin" node "$f" || fail "$f failed"
done

echo; echo "\$ node -e \"require('sparse-mla')\""
bare node -e '
  const m = require("sparse-mla");
  const r = require("sparse-mla/reference");
  if (typeof m.createEngine !== "function" || typeof r.sparsePrefillReference !== "function") throw new Error("require gave no createEngine / sparsePrefillReference");
  console.log(`require: ${Object.keys(m).length} exports, reference ${Object.keys(r).length}`);
' || fail "require('sparse-mla')"

# ---- no install scripts, no optional or peer dependencies, a path with a space; then the tree
# read-only to the user running it (as nobody when this is root, which ignores modes): the
# prebuilt addon still loads, info says the script did not run, and the library writes nothing
ro_app="$work/read only app"
mkdir -p "$ro_app"
cd "$ro_app"
echo '{ "name": "ro-app", "private": true, "type": "module" }' > package.json
bare npm install --no-audit --no-fund --ignore-scripts --omit=optional --omit=peer "$tarball"
[ ! -e node_modules/sparse-mla/build ] || fail "an install without scripts wrote build/"
chmod a+rx "$work"
find . | sort > "$work/ro-before.txt"
chmod -R a-w "$ro_app"
as_user=()
if [ "$(id -u)" = 0 ]; then
  command -v setpriv >/dev/null 2>&1 || fail "running as root: setpriv (util-linux) is needed to run the read-only check as nobody"
  as_user=(setpriv --reuid=65534 --regid=65534 --clear-groups env HOME=/tmp)
fi
(cd / && "${as_user[@]}" env -u CXX -u CC -u CMAKE -u CUDACXX PATH="$bin" "$ro_app/node_modules/.bin/sparse-mla" info --json) > "$work/ro-info.json" || fail "info in the read-only project"
node -e '
  const info = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
  const cpu = info.backends.find((b) => b.name === "cpu");
  if (!info.addon.loaded || info.addon.origin !== "prebuilt" || info.addon.install !== null || !cpu.available) { console.error(JSON.stringify(info.addon, null, 2)); process.exit(1); }
  console.log(`read-only, no scripts: the prebuilt ${info.addon.level} addon loads, install record: none`);
' "$work/ro-info.json" || fail "the prebuilt addon in the read-only project"
(cd "$ro_app" && "${as_user[@]}" env -u CXX -u CC -u CMAKE -u CUDACXX PATH="$bin" node node_modules/sparse-mla/examples/quick_start.mjs) || fail "quick_start.mjs in the read-only project"
(cd "$ro_app" && "${as_user[@]}" env -u CXX -u CC -u CMAKE -u CUDACXX PATH="$bin" SPARSE_MLA_BACKEND=wasm node node_modules/sparse-mla/examples/quick_start.mjs) || fail "quick_start.mjs on wasm in the read-only project"
chmod -R u+w "$ro_app"
find . | sort | diff "$work/ro-before.txt" - || fail "the read-only project changed"

# ---- the source build from the package (CMake must not need test/, which is not packed)
src_app="$work/src-app"
mkdir -p "$src_app"
cd "$src_app"
echo '{ "name": "src-app", "private": true, "type": "module" }' > package.json
SPARSE_MLA_BUILD_FROM_SOURCE=1 npm install --no-audit --no-fund --foreground-scripts "$tarball" cmake-js node-addon-api
node -e '
  const s = JSON.parse(require("fs").readFileSync("node_modules/sparse-mla/build/install-status.json", "utf8"));
  if (s.addon !== "built") { console.error(JSON.stringify(s, null, 2)); process.exit(1); }
  console.log(`source build from the package: ${s.simd}, -march=${s.cpuArch}, cuda ${s.cuda.built ? "built" : `not built (${s.cuda.why})`}, ${s.build.seconds} s`);
' || fail "the source build from the package"
no_build_paths "$src_app/node_modules/sparse-mla" "$src_app/node_modules/sparse-mla/build/addon/Release/sparse_mla_native.node"
./node_modules/.bin/sparse-mla info --json | node -e '
  let t = ""; process.stdin.on("data", (d) => (t += d)).on("end", () => {
    const info = JSON.parse(t);
    if (info.addon.origin !== "source build" || !info.backends.find((b) => b.name === "cpu").available) { console.error(JSON.stringify(info.addon, null, 2)); process.exit(1); }
  });
' || fail "info after the source build"
cd "$root"
echo "package check: OK"
