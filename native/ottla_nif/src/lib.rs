//! Ottla's NIF: librdkafka (through the `rdkafka` crate) behind a small set of NIFs.
//!
//! Data flows one way: librdkafka → Rust threads → messages to BEAM processes. No NIF here
//! blocks a normal scheduler: anything that talks to Kafka runs on a dirty I/O scheduler or on
//! a Rust thread that answers with a message.

mod admin;
mod atoms;
mod clients;
mod config;
mod consumer;
mod context;
mod error;
mod fetch;
mod message;
mod metadata;
mod mock;
mod position;
mod producer;
mod reply;
mod timing;
mod transaction;

rustler::init!("Elixir.Ottla.Native");
