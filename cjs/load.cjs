'use strict';
/** require() of one of the package's ES modules, or an error that says how to load it instead. */
module.exports = function loadEsm(relative, name) {
  try {
    return require(relative);
  } catch (e) {
    if (e && (e.code === 'ERR_REQUIRE_ESM' || e.code === 'ERR_REQUIRE_ASYNC_MODULE')) {
      const err = new Error(
        `${name} is an ES module: require() of it needs Node >= 20.19 with require(esm) on ` +
          `(this is ${process.version}${process.execArgv.includes('--no-experimental-require-module') ? ', started with --no-experimental-require-module' : ''}). ` +
          `Use \`import ... from '${name}'\`, or \`const m = await import('${name}')\` from CommonJS.`,
      );
      err.code = e.code;
      err.cause = e;
      throw err;
    }
    throw e;
  }
};
