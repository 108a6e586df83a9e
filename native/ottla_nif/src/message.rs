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

/// A message read from Kafka, copied out of librdkafka. Messages taken together share one
/// [`Chunk`] (one allocation for their keys and values, one for their metadata), so a
/// message costs no allocation of its own. Cheap to clone: a consumer's partition keeps
/// delivered messages until they are acked, and the batch being encoded shares them. A chunk
/// lives as long as any of its messages (all of one partition, consecutive).
#[derive(Clone)]
pub struct Msg {
    chunk: Arc<Chunk>,
    index: usize,
}

/// Messages copied out of librdkafka together.
#[derive(Default)]
pub struct Chunk {
    /// Each message's key then value, back to back.
    bytes: Vec<u8>,
    metas: Vec<Meta>,
}

struct Meta {
    offset: i64,
    timestamp: Option<i64>,
    /// Where the message's key (then value) starts in `bytes`.
    start: usize,
    /// `None` for a null key or value.
    key_len: Option<usize>,
    value_len: Option<usize>,
    headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Chunk {
    pub fn with_capacity(messages: usize) -> Self {
        Chunk {
            bytes: Vec::new(),
            metas: Vec::with_capacity(messages),
        }
    }

    fn push(
        &mut self,
        offset: i64,
        timestamp: Option<i64>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    ) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(key.unwrap_or_default());
        self.bytes.extend_from_slice(value.unwrap_or_default());
        self.metas.push(Meta {
            offset,
            timestamp,
            start,
            key_len: key.map(<[u8]>::len),
            value_len: value.map(<[u8]>::len),
            headers,
        });
    }

    /// Copies a message taken from a librdkafka queue (`rd_kafka_consume_batch_queue`).
    ///
    /// # Safety
    /// `m` must point to a live message without an error.
    pub unsafe fn push_raw(&mut self, m: *const rd::rd_kafka_message_t) {
        // SAFETY: the caller guarantees a live message; payload and key are `len` bytes or
        // null, owned by the message.
        unsafe {
            let msg = &*m;
            let bytes = |ptr: *mut std::ffi::c_void, len: usize| {
                (!ptr.is_null()).then(|| std::slice::from_raw_parts(ptr as *const u8, len))
            };
            if self.bytes.capacity() == 0 {
                // Room for as many messages of this one's size as the chunk was made for (up
                // to a fetch response's worth; past that the buffer grows as usual).
                let size = msg.key_len + msg.len;
                self.bytes.reserve(
                    size.saturating_mul(self.metas.capacity().max(1))
                        .min(1 << 20),
                );
            }
            let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
            let ts = rd::rd_kafka_message_timestamp(m, &mut kind);
            self.push(
                msg.offset,
                (ts >= 0).then_some(ts),
                bytes(msg.key, msg.key_len),
                bytes(msg.payload, msg.len),
                raw_headers(m),
            );
        }
    }

    pub fn push_borrowed(&mut self, m: &BorrowedMessage<'_>) {
        self.push(
            m.offset(),
            m.timestamp().to_millis(),
            m.key(),
            m.payload(),
            headers(m),
        );
    }

    pub fn is_empty(&self) -> bool {
        self.metas.is_empty()
    }

    pub fn len(&self) -> usize {
        self.metas.len()
    }

    /// The chunk's messages, in the order they were pushed.
    pub fn into_messages(self, out: &mut Vec<Msg>) {
        let count = self.metas.len();
        let chunk = Arc::new(self);
        out.reserve(count);
        out.extend((0..count).map(|index| Msg {
            chunk: chunk.clone(),
            index,
        }));
    }
}

/// What a message costs beyond its key, value and headers (its metadata, its handle).
const MSG_OVERHEAD: usize = 96;

impl Offset for Msg {
    fn offset(&self) -> i64 {
        self.meta().offset
    }

    fn size(&self) -> usize {
        let meta = self.meta();
        let headers: usize = meta
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + 48)
            .sum();
        meta.key_len.unwrap_or(0) + meta.value_len.unwrap_or(0) + headers + MSG_OVERHEAD
    }
}

impl Msg {
    fn meta(&self) -> &Meta {
        &self.chunk.metas[self.index]
    }

    pub fn from_borrowed(m: &BorrowedMessage<'_>) -> Self {
        let mut chunk = Chunk::with_capacity(1);
        chunk.push_borrowed(m);
        Msg {
            chunk: Arc::new(chunk),
            index: 0,
        }
    }

    pub fn timestamp(&self) -> Option<i64> {
        self.meta().timestamp
    }

    pub fn headers(&self) -> &[(Vec<u8>, Option<Vec<u8>>)] {
        &self.meta().headers
    }

    pub fn key(&self) -> Option<&[u8]> {
        let meta = self.meta();
        meta.key_len
            .map(|n| &self.chunk.bytes[meta.start..meta.start + n])
    }

    pub fn value(&self) -> Option<&[u8]> {
        let meta = self.meta();
        let from = meta.start + meta.key_len.unwrap_or(0);
        meta.value_len.map(|n| &self.chunk.bytes[from..from + n])
    }

    /// Key and value bytes, back to back (what a batch binary holds of this message).
    fn key_and_value(&self) -> &[u8] {
        let meta = self.meta();
        let len = meta.key_len.unwrap_or(0) + meta.value_len.unwrap_or(0);
        &self.chunk.bytes[meta.start..meta.start + len]
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
/// give the values: the VM's own term order, so that building each map costs no sorting.
pub fn keys(env: Env<'_>) -> [Term<'_>; 9] {
    [
        atoms::struct_().encode(env),
        atoms::generation_id().encode(env),
        atoms::headers().encode(env),
        atoms::key().encode(env),
        atoms::offset().encode(env),
        atoms::partition().encode(env),
        atoms::timestamp().encode(env),
        atoms::topic().encode(env),
        atoms::value().encode(env),
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
    let total: usize = messages.iter().map(|m| m.key_and_value().len()).sum();
    let mut owned = OwnedBinary::new(total);
    {
        let buf = owned.as_mut_slice();
        let mut at = 0;
        for m in messages {
            // In range: `total` is the sum of these very lengths.
            let part = m.key_and_value();
            buf[at..at + part.len()].copy_from_slice(part);
            at += part.len();
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
    let mut slice = |part: Option<&[u8]>| -> Term<'a> {
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
        let key = slice(m.key());
        let value = slice(m.value());
        let headers = if m.headers().is_empty() {
            empty
        } else {
            m.headers()
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
            generation,
            headers,
            key,
            m.offset().encode(env),
            partition,
            m.timestamp().encode(env),
            topic,
            value,
        ];
        list.push(Term::map_from_arrays(env, &keys, &values).unwrap_or(nil));
    }
    list
}
