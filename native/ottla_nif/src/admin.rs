//! Topic administration and cluster metadata, each call with a short-lived admin client on a
//! dirty I/O scheduler. Create and delete wait until the cluster's metadata shows the change,
//! so a produce right after `create_topic` finds the topic.

use std::time::{Duration, Instant};

use futures_executor::block_on;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::metadata::Metadata;
use rustler::{Atom, NifResult};

use crate::atoms;
use crate::config::client_config;
use crate::context::OttlaContext;
use crate::error::{Error, Result};

fn admin(bootstrap: &str, props: &[(String, String)]) -> Result<AdminClient<OttlaContext>> {
    Ok(client_config(bootstrap, props).create_with_context(OttlaContext)?)
}

fn options(timeout: Duration) -> AdminOptions {
    AdminOptions::new()
        .request_timeout(Some(timeout))
        .operation_timeout(Some(timeout))
}

fn metadata(
    client: &AdminClient<OttlaContext>,
    topic: Option<&str>,
    timeout: Duration,
) -> Result<Metadata> {
    Ok(client.inner().fetch_metadata(topic, timeout)?)
}

/// Partition count and whether every partition has a leader; `None` if the topic is absent.
fn topic_state(md: &Metadata, topic: &str) -> Option<(usize, bool)> {
    md.topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| {
            let parts = t.partitions();
            (
                parts.len(),
                parts.iter().all(|p| p.leader() >= 0 && p.error().is_none()),
            )
        })
}

/// Polls metadata until `done` holds or the deadline passes.
fn wait_for_metadata(
    client: &AdminClient<OttlaContext>,
    topic: &str,
    deadline: Instant,
    done: impl Fn(Option<(usize, bool)>) -> bool,
) -> Result<()> {
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if let Ok(md) = metadata(
            client,
            Some(topic),
            remaining.max(Duration::from_millis(100)),
        ) {
            if done(topic_state(&md, topic)) {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::from_code(
                RDKafkaErrorCode::OperationTimedOut,
                format!("topic {topic:?}: the change did not show in the cluster metadata in time"),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[rustler::nif(schedule = "DirtyIo")]
#[allow(clippy::too_many_arguments)]
fn admin_create_topic(
    bootstrap: String,
    props: Vec<(String, String)>,
    topic: String,
    partitions: i32,
    replicas: i32,
    topic_config: Vec<(String, String)>,
    timeout_ms: u64,
) -> NifResult<Atom> {
    let timeout = Duration::from_millis(timeout_ms);
    let deadline = Instant::now() + timeout;
    let client = admin(&bootstrap, &props)?;
    let mut new_topic = NewTopic::new(&topic, partitions, TopicReplication::Fixed(replicas));
    for (key, value) in &topic_config {
        new_topic = new_topic.set(key, value);
    }
    let results =
        block_on(client.create_topics([&new_topic], &options(timeout))).map_err(Error::from)?;
    for result in results {
        if let Err((name, code)) = result {
            return Err(
                Error::from_code(code, format!("could not create topic {name:?}: {code}")).into(),
            );
        }
    }
    let expected = partitions as usize;
    wait_for_metadata(
        &client,
        &topic,
        deadline,
        |state| matches!(state, Some((n, true)) if n == expected),
    )?;
    Ok(atoms::ok())
}

#[rustler::nif(schedule = "DirtyIo")]
fn admin_delete_topic(
    bootstrap: String,
    props: Vec<(String, String)>,
    topic: String,
    timeout_ms: u64,
) -> NifResult<Atom> {
    let timeout = Duration::from_millis(timeout_ms);
    let deadline = Instant::now() + timeout;
    let client = admin(&bootstrap, &props)?;
    let results = block_on(client.delete_topics(&[topic.as_str()], &options(timeout)))
        .map_err(Error::from)?;
    for result in results {
        if let Err((name, code)) = result {
            return Err(
                Error::from_code(code, format!("could not delete topic {name:?}: {code}")).into(),
            );
        }
    }
    wait_for_metadata(&client, &topic, deadline, |state| state.is_none())?;
    Ok(atoms::ok())
}

/// `{:ok, [{topic, partition_count}]}`, internal topics (`__*`) left out, sorted by name.
#[rustler::nif(schedule = "DirtyIo")]
fn admin_list_topics(
    bootstrap: String,
    props: Vec<(String, String)>,
    timeout_ms: u64,
) -> NifResult<(Atom, Vec<(String, usize)>)> {
    let client = admin(&bootstrap, &props)?;
    let md = metadata(&client, None, Duration::from_millis(timeout_ms))?;
    let mut topics: Vec<(String, usize)> = md
        .topics()
        .iter()
        .filter(|t| t.error().is_none() && !t.name().starts_with("__"))
        .map(|t| (t.name().to_string(), t.partitions().len()))
        .collect();
    topics.sort();
    Ok((atoms::ok(), topics))
}

/// A partition and what its group committed, if anything.
type Committed = (i32, Option<i64>);

/// `{:ok, [{partition, committed_offset | nil}]}`: what consumer group `group` committed for
/// each partition of `topic` (Kafka's convention: the next offset to read).
#[rustler::nif(schedule = "DirtyIo")]
fn admin_committed_offsets(
    bootstrap: String,
    props: Vec<(String, String)>,
    group: String,
    topic: String,
    timeout_ms: u64,
) -> NifResult<(Atom, Vec<Committed>)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};

    let timeout = Duration::from_millis(timeout_ms);
    let mut props = props;
    props.push(("group.id".into(), group));
    props.push(("enable.auto.commit".into(), "false".into()));
    let consumer: BaseConsumer<OttlaContext> = client_config(&bootstrap, &props)
        .create_with_context(OttlaContext)
        .map_err(Error::from)?;
    let count = crate::metadata::partition_count(consumer.client(), &topic, timeout)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..count {
        tpl.add_partition(&topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, timeout)
        .map_err(Error::from)?;
    let mut out: Vec<Committed> = committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => (e.partition(), Some(o)),
            _ => (e.partition(), None),
        })
        .collect();
    out.sort();
    Ok((atoms::ok(), out))
}
