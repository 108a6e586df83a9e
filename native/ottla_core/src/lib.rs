//! Ottla's pure logic: the parts of the NIF that neither call the BEAM nor librdkafka, kept in
//! a plain crate so `cargo test` can run them (a NIF's test binary cannot load without the
//! BEAM's `enif_*` symbols).

pub mod cell;
pub mod errors;
pub mod partition;
