//! Encoding Kafka messages as `%Ottla.Message{}` terms.

use rdkafka::message::{BorrowedMessage, Headers, Message};
use rustler::types::binary::NewBinary;
use rustler::{Encoder, Env, Term};

use crate::atoms;

fn binary<'a>(env: Env<'a>, bytes: Option<&[u8]>) -> Term<'a> {
    match bytes {
        Some(bytes) => {
            let mut bin = NewBinary::new(env, bytes.len());
            bin.as_mut_slice().copy_from_slice(bytes);
            let bin: rustler::Binary = bin.into();
            bin.to_term(env)
        }
        None => atoms::nil().encode(env),
    }
}

/// The keys of an `%Ottla.Message{}` map, in the order `encode` and the consumer's batches
/// give the values.
pub fn keys(env: Env<'_>) -> [Term<'_>; 9] {
    [
        atoms::struct_().encode(env),
        atoms::topic().encode(env),
        atoms::partition().encode(env),
        atoms::offset().encode(env),
        atoms::key().encode(env),
        atoms::value().encode(env),
        atoms::timestamp().encode(env),
        atoms::headers().encode(env),
        atoms::generation_id().encode(env),
    ]
}

/// `%Ottla.Message{}` for a message read from Kafka. `topic` is passed in so a batch shares
/// one binary for it.
pub fn encode<'a>(
    env: Env<'a>,
    msg: &BorrowedMessage<'_>,
    topic: Term<'a>,
    generation_id: Option<i32>,
) -> Term<'a> {
    let headers: Vec<Term<'a>> = match msg.headers() {
        Some(hs) => hs
            .iter()
            .map(|h| (binary(env, Some(h.key.as_bytes())), binary(env, h.value)).encode(env))
            .collect(),
        None => Vec::new(),
    };
    let keys = keys(env);
    let values = [
        atoms::ottla_message().encode(env),
        topic,
        msg.partition().encode(env),
        msg.offset().encode(env),
        binary(env, msg.key()),
        binary(env, msg.payload()),
        msg.timestamp().to_millis().encode(env),
        headers.encode(env),
        generation_id.encode(env),
    ];
    // The keys are distinct atoms: map_from_arrays only fails on duplicate keys.
    Term::map_from_arrays(env, &keys, &values).unwrap_or_else(|_| atoms::error().encode(env))
}
