//! `fetch`: read a range of one partition with a fetch consumer of the call's clients
//! (`clients.rs`: assigned, never in a group, committing nothing), on a Rust thread of its own
//! that answers by message (`reply.rs`). A fetch cursor keeps one fetch consumer for a whole
//! `Ottla.Fetch.fetch_stream/3`: each chunk goes on where the last one stopped, from what the
//! consumer has prefetched, without a new assignment.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::error::RDKafkaErrorCode;
use rustler::{Atom, Encoder, Env, LocalPid, ResourceArc, Term};

use crate::atoms;
use crate::clients::{assign_at, no_partition, pause, resume, Clients, ClientsResource, Fetcher};
use crate::error::{Error, Result};
use crate::message;
use crate::position::Position;
use crate::reply;

/// What a read asks for: from `from` (a [`Position`]; `:latest` reads nothing) up to the high
/// watermark, or `until` (exclusive) when that is lower, at most `max` messages.
struct Read {
    topic: String,
    partition: i32,
    from: Position,
    until: Option<i64>,
    max: usize,
    timeout: Duration,
}

/// Answers `{:ok, high_watermark, [%Ottla.Message{}]}` with the messages from `offset` (or
/// the log start, if `offset` is older) up to the high watermark, at most `max_messages`.
#[rustler::nif]
#[allow(clippy::too_many_arguments)]
fn fetch_messages(
    pid: LocalPid,
    tag: u64,
    clients: ResourceArc<ClientsResource>,
    topic: String,
    partition: i32,
    from: Position,
    max_messages: usize,
    timeout_ms: u64,
) -> Atom {
    let clients = clients.0.clone();
    let read = Read {
        topic,
        partition,
        from,
        until: None,
        max: max_messages,
        timeout: Duration::from_millis(timeout_ms),
    };
    reply::spawn("ottla-fetch", pid, tag, move |env| {
        let result = clients.take_fetcher().and_then(|mut fetcher| {
            let result = fetch(env, &clients, &mut fetcher, &read);
            keep_unless_stale(&clients, fetcher, &result);
            result
        });
        finish(env, &clients, &read.topic, result)
    })
}

/// Whether a read failed because the topic or partition is unknown: the consumer's view of
/// the topic may be stale (librdkafka keeps a topic it looked at while it was being created
/// without partitions until its next periodic refresh), so it is not reused.
fn stale(result: &Result<Term<'_>>) -> bool {
    matches!(result, Err(e) if e.code == "unknown_partition" || e.code == "unknown_topic_or_partition")
}

/// Gives the fetch consumer back to the pool, unless its view of the topic may be stale.
fn keep_unless_stale(clients: &Clients, fetcher: Fetcher, result: &Result<Term<'_>>) {
    if stale(result) {
        drop(fetcher);
    } else {
        clients.give_back(fetcher);
    }
}

fn finish<'a>(env: Env<'a>, clients: &Clients, topic: &str, result: Result<Term<'a>>) -> Term<'a> {
    let result = match result {
        Ok(term) => {
            clients.succeeded();
            Ok(term)
        }
        Err(err) => {
            // The topic may have changed (deleted, recreated, grown): ask again next time.
            clients.forget(topic);
            Err(clients.explain(err))
        }
    };
    reply::answer(env, result)
}

/// One fetch consumer held for a whole stream.
pub struct FetchCursor {
    clients: Arc<Clients>,
    fetcher: Mutex<Option<Fetcher>>,
}

#[rustler::resource_impl]
impl rustler::Resource for FetchCursor {}

impl Drop for FetchCursor {
    fn drop(&mut self) {
        // Giving the consumer back stops its assignment, which waits on librdkafka's threads.
        let taken = self.fetcher.get_mut().ok().and_then(|f| f.take());
        if let Some(fetcher) = taken {
            let clients = self.clients.clone();
            let _ = std::thread::Builder::new()
                .name("ottla-fetch-close".into())
                .spawn(move || clients.give_back(fetcher));
        }
    }
}

/// A cursor over `clients`; it takes a fetch consumer on its first read.
#[rustler::nif]
fn fetch_cursor_new(clients: ResourceArc<ClientsResource>) -> ResourceArc<FetchCursor> {
    ResourceArc::new(FetchCursor {
        clients: clients.0.clone(),
        fetcher: Mutex::new(None),
    })
}

/// Like `fetch_messages`, with the cursor's consumer, stopping before `until` when given.
#[rustler::nif]
#[allow(clippy::too_many_arguments)]
fn fetch_cursor_read(
    pid: LocalPid,
    tag: u64,
    cursor: ResourceArc<FetchCursor>,
    topic: String,
    partition: i32,
    from: Position,
    until: Option<i64>,
    max_messages: usize,
    timeout_ms: u64,
) -> Atom {
    let read = Read {
        topic,
        partition,
        from,
        until,
        max: max_messages,
        timeout: Duration::from_millis(timeout_ms),
    };
    reply::spawn("ottla-fetch", pid, tag, move |env| {
        let clients = cursor.clients.clone();
        let result = match cursor.fetcher.lock() {
            Ok(mut slot) => {
                let fetcher = match slot.take() {
                    Some(fetcher) => Ok(fetcher),
                    None => clients.take_fetcher(),
                };
                fetcher.and_then(|mut fetcher| {
                    let result = fetch(env, &clients, &mut fetcher, &read);
                    if stale(&result) {
                        drop(fetcher);
                    } else {
                        *slot = Some(fetcher);
                    }
                    result
                })
            }
            Err(_) => Err(Error::new("internal", "the fetch cursor is unusable")),
        };
        finish(env, &clients, &read.topic, result)
    })
}

/// Gives the cursor's consumer back to its clients' pool on a thread, which answers `:ok`
/// once it is there (the stream's next user then takes the same one).
#[rustler::nif]
fn fetch_cursor_close(pid: LocalPid, tag: u64, cursor: ResourceArc<FetchCursor>) -> Atom {
    reply::spawn("ottla-fetch-close", pid, tag, move |env| {
        let taken = cursor.fetcher.lock().ok().and_then(|mut f| f.take());
        if let Some(fetcher) = taken {
            cursor.clients.give_back(fetcher);
        }
        atoms::ok().encode(env)
    })
}

fn fetch<'a>(
    env: Env<'a>,
    clients: &Clients,
    fetcher: &mut Fetcher,
    read: &Read,
) -> Result<Term<'a>> {
    let (topic, partition) = (read.topic.as_str(), read.partition);
    let deadline = reply::deadline_after(read.timeout);
    let partitions = clients.partition_count(topic, partition + 1, read.timeout)?;
    if partition >= partitions {
        return Err(no_partition(topic, partition, partitions));
    }
    let left = || deadline.saturating_duration_since(Instant::now());
    let (low, high) = match fetcher.consumer.fetch_watermarks(topic, partition, left()) {
        // The consumer's own metadata may predate the partition (the topic grew since it last
        // looked, as the count above shows): it looks again, once.
        Err(err) if unknown_partition(&err) => {
            fetcher.consumer.fetch_metadata(Some(topic), left())?;
            fetcher
                .consumer
                .fetch_watermarks(topic, partition, left())?
        }
        other => other?,
    };
    let start = match read.from {
        Position::Earliest => low,
        Position::Latest => high,
        Position::Offset(o) => o.max(low),
    };
    let end = read.until.map_or(high, |until| until.min(high));
    let topic_term = topic.encode(env);
    // The fetched messages share one chunk (one allocation for their bytes).
    let mut chunk = message::Chunk::default();
    if start < end && read.max > 0 {
        let continues = matches!(&fetcher.at, Some((t, p, next)) if t == topic && *p == partition && *next == start);
        if continues {
            resume(fetcher);
        } else {
            assign_at(fetcher, topic, partition, start)?;
        }
        // Until this read ends well, the consumer's position is unknown: the next read assigns.
        let mut next = start;
        fetcher.at = Some((String::new(), -1, -1));
        let last_wanted = end - 1;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::from_code(
                    RDKafkaErrorCode::OperationTimedOut,
                    format!(
                        "fetch of {topic:?}/{partition} timed out after {} of the messages up to offset {last_wanted}",
                        chunk.len()
                    ),
                ));
            }
            match fetcher.consumer.poll(left.min(Duration::from_millis(100))) {
                // Control records or compaction can leave no message at `last_wanted`: stop once
                // the consumer's position has passed it.
                None => {
                    let position = fetcher.consumer.position().ok().and_then(|tpl| {
                        tpl.find_partition(topic, partition)
                            .and_then(|p| p.offset().to_raw())
                    });
                    if let Some(position) = position.filter(|pos| *pos > last_wanted) {
                        next = position;
                        break;
                    }
                }
                Some(Err(err)) => return Err(Error::from(err)),
                Some(Ok(msg)) => {
                    use rdkafka::message::Message;
                    // Left from an earlier assignment (librdkafka drops most such): not ours.
                    if msg.topic() != topic || msg.partition() != partition || msg.offset() < next {
                        continue;
                    }
                    let at = msg.offset();
                    if at > last_wanted {
                        // Past the end (a gap before it): not delivered, so the next read
                        // must assign again to see it.
                        return Ok(answer(env, high, topic_term, partition, chunk));
                    }
                    next = at + 1;
                    chunk.push_borrowed(&msg);
                    if at >= last_wanted || chunk.len() >= read.max {
                        break;
                    }
                }
            }
        }
        fetcher.at = Some((topic.to_string(), partition, next));
        if next >= high {
            // At the log end: a stream's next read may be a while.
            pause(fetcher, topic, partition);
        }
    }
    Ok(answer(env, high, topic_term, partition, chunk))
}

fn unknown_partition(err: &rdkafka::error::KafkaError) -> bool {
    matches!(
        err.rdkafka_error_code(),
        Some(RDKafkaErrorCode::UnknownPartition | RDKafkaErrorCode::UnknownTopicOrPartition)
    )
}

fn answer<'a>(
    env: Env<'a>,
    high: i64,
    topic: Term<'a>,
    partition: i32,
    chunk: message::Chunk,
) -> Term<'a> {
    let mut out = Vec::new();
    chunk.into_messages(&mut out);
    let list = message::encode_list(env, topic, partition, None, &out);
    (atoms::ok(), high, list).encode(env)
}
