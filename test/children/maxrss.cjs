// Preloaded (node --require) by test/cli_files.test.ts: when the process exits, writes its peak
// resident set (KiB) to $SMLA_MAXRSS_FILE, so a test can tell that a file was not read.
const { writeFileSync } = require('node:fs');
process.on('exit', () => {
  if (process.env.SMLA_MAXRSS_FILE) writeFileSync(process.env.SMLA_MAXRSS_FILE, String(process.resourceUsage().maxRSS));
});
