// The load driver lives in tools/ (the demo and the benchmarks use it too, and the build must not compile test/).
export * from '../../tools/load-driver.js'
