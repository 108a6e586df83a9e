//! `fetch`: read a range of one partition with a short-lived consumer that joins no group
//! and commits nothing, on a Rust thread of its own that answers by message (`reply.rs`).

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use rustler::{Atom, Encoder, Env, LocalPid, Term};

use crate::atoms;
use crate::config::client_config;
use crate::context::OttlaContext;
use crate::error::{Error, Result};
use crate::message;
use crate::metadata::partition_count;
use crate::position::Position;
use crate::reply;

/// Answers `{:ok, high_watermark, [%Ottla.Message{}]}` with the messages from `offset` (or
/// the log start, if `offset` is older) up to the high watermark, at most `max_messages`.
/// `from` is a [`Position`]; `:latest` reads nothing.
#[rustler::nif]
#[allow(clippy::too_many_arguments)]
fn fetch_messages(
    pid: LocalPid,
    tag: u64,
    bootstrap: String,
    props: Vec<(String, String)>,
    topic: String,
    partition: i32,
    from: Position,
    max_messages: usize,
    timeout_ms: u64,
) -> Atom {
    reply::spawn("ottla-fetch", pid, tag, move |env| {
        let ctx = OttlaContext::default();
        let result = fetch(
            env,
            &ctx,
            bootstrap,
            props,
            &topic,
            partition,
            from,
            max_messages,
            Duration::from_millis(timeout_ms),
        );
        reply::answer(env, result.map_err(|e| ctx.explain(e)))
    })
}

#[allow(clippy::too_many_arguments)]
fn fetch<'a>(
    env: Env<'a>,
    ctx: &OttlaContext,
    bootstrap: String,
    props: Vec<(String, String)>,
    topic: &str,
    partition: i32,
    from: Position,
    max_messages: usize,
    timeout: Duration,
) -> Result<Term<'a>> {
    let deadline = reply::deadline_after(timeout);
    let mut props = props;
    props.push(("group.id".into(), "ottla-fetch".into()));
    props.push(("enable.auto.commit".into(), "false".into()));
    props.push(("enable.auto.offset.store".into(), "false".into()));
    props.push(("auto.offset.reset".into(), "earliest".into()));
    let consumer: BaseConsumer<OttlaContext> =
        client_config(&bootstrap, &props).create_with_context(ctx.clone())?;
    let _serve = crate::context::ServeOnDrop(&consumer);

    let partitions = partition_count(consumer.client(), topic, timeout)?;
    if partition >= partitions {
        return Err(Error::from_code(
            RDKafkaErrorCode::UnknownPartition,
            format!("partition {partition} does not exist: topic {topic:?} has {partitions}"),
        ));
    }

    let (low, high) = consumer.fetch_watermarks(
        topic,
        partition,
        deadline.saturating_duration_since(Instant::now()),
    )?;
    let start = match from {
        Position::Earliest => low,
        Position::Latest => high,
        Position::Offset(o) => o.max(low),
    };
    let topic_term = topic.encode(env);
    // The fetched messages share one chunk (one allocation for their bytes).
    let mut chunk = message::Chunk::default();
    if start < high && max_messages > 0 {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(start))?;
        consumer.assign(&tpl)?;
        let last_wanted = high - 1;
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
            match consumer.poll(left.min(Duration::from_millis(100))) {
                // Control records or compaction can leave no message at `last_wanted`: stop once
                // the consumer's position has passed the high watermark.
                None => {
                    let reached = consumer
                        .position()
                        .ok()
                        .and_then(|tpl| {
                            tpl.find_partition(topic, partition)
                                .and_then(|p| p.offset().to_raw())
                        })
                        .is_some_and(|pos| pos >= high);
                    if reached {
                        break;
                    }
                }
                Some(Err(err)) => return Err(Error::from(err)),
                Some(Ok(msg)) => {
                    let at = rdkafka::message::Message::offset(&msg);
                    chunk.push_borrowed(&msg);
                    if at >= last_wanted || chunk.len() >= max_messages {
                        break;
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    chunk.into_messages(&mut out);
    let list = message::encode_list(env, topic_term, partition, None, &out);
    Ok((atoms::ok(), high, list).encode(env))
}
