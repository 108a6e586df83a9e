//! Kafka messages as Ottla holds them ([`Msg`]) and their one encoding as `%Ottla.Message{}`
//! terms, shared by the consumer's batches and `fetch`.

use std::ffi::CStr;
use std::sync::Arc;

use ottla_core::partition::Offset;
use rdkafka::bindings as rd;
use rdkafka::message::{BorrowedMessage, Message};
use rustler::types::binary::{NewBinary, OwnedBinary};
use rustler::{Binary, Encoder, Env, Term};

use crate::atoms;

/// A message read from Kafka, copied out of librdkafka. Cheap to clone: a consumer's
/// partition keeps delivered messages until they are acked, and the batch being encoded
/// shares them.
#[derive(Clone)]
pub struct Msg(Arc<MsgData>);

pub struct MsgData {
    pub offset: i64,
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl std::ops::Deref for Msg {
    type Target = MsgData;
    fn deref(&self) -> &MsgData {
        &self.0
    }
}

impl Offset for Msg {
    fn offset(&self) -> i64 {
        self.0.offset
    }
}

impl Msg {
    pub fn from_borrowed(m: &BorrowedMessage<'_>) -> Self {
        Msg(Arc::new(MsgData {
            offset: m.offset(),
            timestamp: m.timestamp().to_millis(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers: headers(m),
        }))
    }
}

impl Msg {
    /// Copies a message taken from a librdkafka queue (`rd_kafka_consume_batch_queue`).
    ///
    /// # Safety
    /// `m` must point to a live message without an error.
    pub unsafe fn from_raw(m: *const rd::rd_kafka_message_t) -> Self {
        // SAFETY: the caller guarantees a live message; payload and key are `len` bytes or
        // null, owned by the message.
        unsafe {
            let msg = &*m;
            let bytes = |ptr: *mut std::ffi::c_void, len: usize| {
                (!ptr.is_null()).then(|| std::slice::from_raw_parts(ptr as *const u8, len).to_vec())
            };
            let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
            let ts = rd::rd_kafka_message_timestamp(m, &mut kind);
            Msg(Arc::new(MsgData {
                offset: msg.offset,
                timestamp: (ts >= 0).then_some(ts),
                key: bytes(msg.key, msg.key_len),
                value: bytes(msg.payload, msg.len),
                headers: raw_headers(m),
            }))
        }
    }
}

/// A message's headers as `(name, value)` bytes. Read through librdkafka's C API because
/// the `rdkafka` crate panics on a header name that is not UTF-8, which any producer can send.
pub fn headers(msg: &BorrowedMessage<'_>) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    // SAFETY: `msg.ptr()` is a live message for the duration of the call.
    unsafe { raw_headers(msg.ptr()) }
}

/// # Safety
/// `msg` must point to a live message.
unsafe fn raw_headers(msg: *const rd::rd_kafka_message_t) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let mut hdrs: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `msg` is a live message; librdkafka sets `hdrs` (owned by the message)
    // or returns an error when there are none.
    let err = unsafe { rd::rd_kafka_message_headers(msg, &mut hdrs) };
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

/// `[%Ottla.Message{}]` for messages of one partition. Keys and values are sub-binaries of
/// one binary, so a batch costs one allocation on the BEAM side.
pub fn encode_list<'a>(
    env: Env<'a>,
    topic: Term<'a>,
    partition: i32,
    generation: Option<i32>,
    messages: &[Msg],
) -> Vec<Term<'a>> {
    let total: usize = messages
        .iter()
        .map(|m| m.key.as_ref().map_or(0, Vec::len) + m.value.as_ref().map_or(0, Vec::len))
        .sum();
    let mut owned = OwnedBinary::new(total);
    {
        let buf = owned.as_mut_slice();
        let mut at = 0;
        for m in messages {
            for part in [&m.key, &m.value].into_iter().flatten() {
                // In range: `total` is the sum of these very lengths.
                buf[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
        }
    }
    let whole = Binary::from_owned(owned, env);
    let nil = atoms::nil().encode(env);
    let generation = generation.encode(env);
    let keys = keys(env);
    let struct_name = atoms::ottla_message().encode(env);
    let partition = partition.encode(env);
    let empty: Vec<Term<'a>> = Vec::new();
    let empty = empty.encode(env);
    let mut at = 0;
    let mut slice = |part: &Option<Vec<u8>>| -> Term<'a> {
        match part {
            Some(bytes) => {
                let t = whole
                    .make_subbinary(at, bytes.len())
                    .map(|b| b.to_term(env))
                    .unwrap_or(nil);
                at += bytes.len();
                t
            }
            None => nil,
        }
    };
    let mut list: Vec<Term<'a>> = Vec::with_capacity(messages.len());
    for m in messages {
        let key = slice(&m.key);
        let value = slice(&m.value);
        let headers = if m.headers.is_empty() {
            empty
        } else {
            m.headers
                .iter()
                .map(|(k, v)| {
                    let k = binary(env, Some(k));
                    (k, binary(env, v.as_deref())).encode(env)
                })
                .collect::<Vec<Term<'a>>>()
                .encode(env)
        };
        let values = [
            struct_name,
            topic,
            partition,
            m.offset.encode(env),
            key,
            value,
            m.timestamp.encode(env),
            headers,
            generation,
        ];
        list.push(Term::map_from_arrays(env, &keys, &values).unwrap_or(nil));
    }
    list
}
