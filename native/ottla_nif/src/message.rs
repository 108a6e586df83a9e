//! Encoding Kafka messages as `%Ottla.Message{}` terms.

use std::ffi::CStr;

use rdkafka::bindings as rd;
use rdkafka::message::{BorrowedMessage, Message};
use rustler::types::binary::NewBinary;
use rustler::{Encoder, Env, Term};

use crate::atoms;

/// A message's headers as `(name, value)` bytes. Read through librdkafka's C API because
/// the `rdkafka` crate panics on a header name that is not UTF-8, which any producer can send.
pub fn headers(msg: &BorrowedMessage<'_>) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let mut hdrs: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `msg.ptr()` is a live message; librdkafka sets `hdrs` (owned by the message)
    // or returns an error when there are none.
    let err = unsafe { rd::rd_kafka_message_headers(msg.ptr(), &mut hdrs) };
    if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || hdrs.is_null() {
        return Vec::new();
    }
    // SAFETY: `hdrs` stays valid while `msg` lives, which outlasts this function.
    let count = unsafe { rd::rd_kafka_header_cnt(hdrs) };
    let mut out = Vec::with_capacity(count);
    for idx in 0..count {
        let mut name: *const std::os::raw::c_char = std::ptr::null();
        let mut value: *const std::os::raw::c_void = std::ptr::null();
        let mut size: usize = 0;
        // SAFETY: idx < count; the out-parameters are valid pointers.
        let err =
            unsafe { rd::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            continue;
        }
        // SAFETY: librdkafka gives a NUL-terminated name and `size` bytes of value (or null).
        let name = unsafe { CStr::from_ptr(name) }.to_bytes().to_vec();
        let value = (!value.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(value as *const u8, size) }.to_vec());
        out.push((name, value));
    }
    out
}

pub fn binary<'a>(env: Env<'a>, bytes: Option<&[u8]>) -> Term<'a> {
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
    let headers: Vec<Term<'a>> = headers(msg)
        .iter()
        .map(|(k, v)| (binary(env, Some(k)), binary(env, v.as_deref())).encode(env))
        .collect();
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
