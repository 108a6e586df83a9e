//! The dispatch thread: sends each partition's next batch to its worker process when the
//! worker asked for one. One batch is one Erlang message; its keys and values are
//! sub-binaries of one binary, so a batch costs one allocation on the BEAM side.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rustler::types::binary::OwnedBinary;
use rustler::{Binary, Encoder, Env, OwnedEnv, Term};

use ottla_core::partition::Event;

use super::{Outgoing, Shared, Tp};
use crate::atoms;

/// Demand from the NIFs wakes this thread when the state lock is free; otherwise this wait
/// bounds how late it notices.
const IDLE_WAIT: Duration = Duration::from_millis(2);

pub fn run(shared: Arc<Shared>) {
    let mut env = OwnedEnv::new();
    let group = shared.settings.group;
    loop {
        let outgoing = {
            let mut st = shared.lock();
            loop {
                if shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                // Demand and acks arrive through the cells: let every partition look.
                let keys: Vec<Tp> = st.partitions.keys().cloned().collect();
                for tp in &keys {
                    st.handle(tp, Event::Tick);
                }
                if !st.outbox.is_empty() {
                    break std::mem::take(&mut st.outbox);
                }
                st = shared
                    .work
                    .wait_timeout(st, IDLE_WAIT)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
        };
        for o in outgoing {
            let pid = o.pid;
            let _ = env.send_and_clear(&pid, |env| encode_batch(env, o, group));
        }
    }
}

/// `{:ottla_messages, topic, partition, generation, [%Ottla.Message{}]}`
fn encode_batch<'a>(env: Env<'a>, o: Outgoing, group: bool) -> Term<'a> {
    let total: usize = o
        .messages
        .iter()
        .map(|m| m.key.as_ref().map_or(0, Vec::len) + m.value.as_ref().map_or(0, Vec::len))
        .sum();
    let mut owned = OwnedBinary::new(total);
    {
        let buf = owned.as_mut_slice();
        let mut at = 0;
        for m in &o.messages {
            for part in [&m.key, &m.value].into_iter().flatten() {
                buf[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
        }
    }
    let whole = Binary::from_owned(owned, env);
    let nil = atoms::nil().encode(env);
    let topic = o.topic.encode(env);
    let generation = if group { o.generation.encode(env) } else { nil };
    let keys = crate::message::keys(env);
    let struct_name = atoms::ottla_message().encode(env);
    let partition = o.partition.encode(env);
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
    let mut list: Vec<Term<'a>> = Vec::with_capacity(o.messages.len());
    for m in &o.messages {
        let key = slice(&m.key);
        let value = slice(&m.value);
        let headers = if m.headers.is_empty() {
            empty
        } else {
            m.headers
                .iter()
                .map(|(k, v)| {
                    let k = crate::message::binary(env, Some(k));
                    (k, crate::message::binary(env, v.as_deref())).encode(env)
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
    (
        atoms::ottla_messages(),
        topic,
        partition,
        o.generation,
        list,
    )
        .encode(env)
}
