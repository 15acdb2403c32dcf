'use strict';
// require('sparse-mla'): the package is an ES module; Node >= 20.19 loads it through require().
// Older Node refuses with ERR_REQUIRE_ESM, turned here into a message saying what to do.
module.exports = require('./load.cjs')('../dist/index.js', 'sparse-mla');
