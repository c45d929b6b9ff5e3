// Node workload for the JIT-frame tests: `work` calls `leafA` three times
// for each call of `leafB`; both leaves run the same loop, so their CPU
// time splits 3:1. Runs for the seconds given on the command line.
'use strict';

function leafA(n) {
  let total = 0;
  for (let i = 0; i < n; i++) total += (i * i) % 7;
  return total;
}

function leafB(n) {
  let total = 0;
  for (let i = 0; i < n; i++) total += (i * i) % 7;
  return total;
}

function work(deadline) {
  let sink = 0;
  while (Date.now() < deadline) {
    for (let k = 0; k < 3; k++) sink += leafA(2000);
    sink += leafB(2000);
  }
  return sink;
}

console.log(work(Date.now() + 1000 * Number(process.argv[2])) % 10);
