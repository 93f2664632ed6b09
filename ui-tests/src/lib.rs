//! Compile-time tests of the queue macros live in `tests/`.
