'use strict';
// require('sparse-mla/reference'): see index.cjs.
module.exports = require('./load.cjs')('../dist/reference/index.js', 'sparse-mla/reference');
