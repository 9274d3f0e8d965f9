"""The example domain, which a user replaces with their own: devices that report readings (the
projection in `devices`, its tables in `migrations/`), used by the demo, the tests and the benchmarks.
The engine never imports it; `handlers.loading` adds it to every worker beside the user's projections."""
