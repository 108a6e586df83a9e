//! Topic administration and cluster metadata, each call with a short-lived admin client on a
//! Rust thread of its own that answers by message (`reply.rs`). Create waits until every
//! partition's leader answers for the topic, and delete until the metadata no longer shows
//! it, so a produce or fetch right after `create_topic` finds the topic.

use std::time::{Duration, Instant};

use futures_executor::block_on;
use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::metadata::Metadata;
use std::ffi::CString;

use rdkafka::bindings as rd;
use rustler::{Atom, LocalPid};

use crate::atoms;
use crate::config::client_config;
use crate::context::OttlaContext;
use crate::error::{Error, Result};
use crate::reply;

/// A short-lived admin client. Nothing polls its main queue while it works, so librdkafka's
/// error callbacks (why a broker refused it) wait there: dropping it serves them first, so the
/// context knows the cause when the call's error is explained.
struct Admin(AdminClient<OttlaContext>);

impl std::ops::Deref for Admin {
    type Target = AdminClient<OttlaContext>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        let client = self.0.inner();
        crate::context::serve_main_queue(client.native_ptr(), client.context());
    }
}

fn admin(ctx: &OttlaContext, bootstrap: &str, props: &[(String, String)]) -> Result<Admin> {
    Ok(Admin(
        client_config(bootstrap, props).create_with_context(ctx.clone())?,
    ))
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

/// Runs an admin call on a Rust thread with a fresh client context, and answers its result;
/// a failure is explained by why a broker refused the client, if one did.
fn answer_call<T, F>(pid: LocalPid, tag: u64, call: F) -> Atom
where
    T: rustler::Encoder,
    F: FnOnce(&OttlaContext) -> Result<T> + Send + 'static,
{
    reply::spawn("ottla-admin", pid, tag, move |env| {
        let ctx = OttlaContext::default();
        let result = call(&ctx).map_err(|e| ctx.explain(e));
        reply::answer(env, result)
    })
}

/// Whether the leader of every partition of `topic` answers for it (a ListOffsets request
/// goes to the partition's leader): metadata alone can show a topic before its leaders serve it.
fn leaders_serve(client: &AdminClient<OttlaContext>, topic: &str, partitions: i32) -> bool {
    let Ok(name) = CString::new(topic) else {
        return false;
    };
    (0..partitions).all(|p| {
        let (mut low, mut high) = (-1i64, -1i64);
        // SAFETY: the client is live; the out-parameters are valid.
        let err = unsafe {
            rd::rd_kafka_query_watermark_offsets(
                client.inner().native_ptr(),
                name.as_ptr(),
                p,
                &mut low,
                &mut high,
                2_000,
            )
        };
        err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
    })
}

#[allow(clippy::too_many_arguments)]
fn create_topic(
    ctx: &OttlaContext,
    bootstrap: &str,
    props: &[(String, String)],
    topic: &str,
    partitions: i32,
    replicas: i32,
    topic_config: &[(String, String)],
    timeout: Duration,
) -> Result<Atom> {
    let deadline = reply::deadline_after(timeout);
    let client = admin(ctx, bootstrap, props)?;
    let mut new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(replicas));
    for (key, value) in topic_config {
        new_topic = new_topic.set(key, value);
    }
    let results = block_on(client.create_topics([&new_topic], &options(timeout)))?;
    for result in results {
        if let Err((name, code)) = result {
            return Err(Error::from_code(
                code,
                format!("could not create topic {name:?}: {code}"),
            ));
        }
    }
    let expected = partitions as usize;
    wait_for_metadata(
        &client,
        topic,
        deadline,
        |state| matches!(state, Some((n, true)) if n == expected),
    )?;
    while !leaders_serve(&client, topic, partitions) {
        if Instant::now() >= deadline {
            return Err(Error::from_code(
                RDKafkaErrorCode::OperationTimedOut,
                format!(
                    "topic {topic:?} was created, but not every partition's leader serves it yet"
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(atoms::ok())
}

/// Creates a topic; answers `:ok` once every partition's leader serves it.
#[rustler::nif]
#[allow(clippy::too_many_arguments)]
fn admin_create_topic(
    pid: LocalPid,
    tag: u64,
    bootstrap: String,
    props: Vec<(String, String)>,
    topic: String,
    partitions: i32,
    replicas: i32,
    topic_config: Vec<(String, String)>,
    timeout_ms: u64,
) -> Atom {
    let timeout = Duration::from_millis(timeout_ms);
    answer_call(pid, tag, move |ctx| {
        let (name, config) = (&topic, &topic_config);
        create_topic(
            ctx, &bootstrap, &props, name, partitions, replicas, config, timeout,
        )
    })
}

/// Grows `topic` to `partitions` partitions; waits until the metadata shows them all with a
/// leader that serves them, so producers and consumers refreshing their metadata find them.
fn create_partitions(
    ctx: &OttlaContext,
    bootstrap: &str,
    props: &[(String, String)],
    topic: &str,
    partitions: usize,
    timeout: Duration,
) -> Result<Atom> {
    let deadline = Instant::now() + timeout;
    let client = admin(ctx, bootstrap, props)?;
    let results = block_on(
        client.create_partitions([&NewPartitions::new(topic, partitions)], &options(timeout)),
    )?;
    for result in results {
        if let Err((name, code)) = result {
            return Err(Error::from_code(
                code,
                format!("could not grow topic {name:?} to {partitions} partitions: {code}"),
            ));
        }
    }
    wait_for_metadata(
        &client,
        topic,
        deadline,
        |state| matches!(state, Some((n, true)) if n == partitions),
    )?;
    while !leaders_serve(&client, topic, partitions as i32) {
        if Instant::now() >= deadline {
            return Err(Error::from_code(
                RDKafkaErrorCode::OperationTimedOut,
                format!("topic {topic:?} grew, but not every partition's leader serves it yet"),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(atoms::ok())
}

/// Grows a topic to `partitions` partitions; answers `:ok` once every partition's leader
/// serves it.
#[rustler::nif]
fn admin_create_partitions(
    pid: LocalPid,
    tag: u64,
    bootstrap: String,
    props: Vec<(String, String)>,
    topic: String,
    partitions: usize,
    timeout_ms: u64,
) -> Atom {
    let timeout = Duration::from_millis(timeout_ms);
    answer_call(pid, tag, move |ctx| {
        create_partitions(ctx, &bootstrap, &props, &topic, partitions, timeout)
    })
}

fn delete_topic(
    ctx: &OttlaContext,
    bootstrap: &str,
    props: &[(String, String)],
    topic: &str,
    timeout: Duration,
) -> Result<Atom> {
    let deadline = reply::deadline_after(timeout);
    let client = admin(ctx, bootstrap, props)?;
    let results = block_on(client.delete_topics(&[topic], &options(timeout)))?;
    for result in results {
        if let Err((name, code)) = result {
            return Err(Error::from_code(
                code,
                format!("could not delete topic {name:?}: {code}"),
            ));
        }
    }
    wait_for_metadata(&client, topic, deadline, |state| state.is_none())?;
    Ok(atoms::ok())
}

/// Deletes a topic; answers `:ok` once the metadata no longer shows it.
#[rustler::nif]
fn admin_delete_topic(
    pid: LocalPid,
    tag: u64,
    bootstrap: String,
    props: Vec<(String, String)>,
    topic: String,
    timeout_ms: u64,
) -> Atom {
    let timeout = Duration::from_millis(timeout_ms);
    answer_call(pid, tag, move |ctx| {
        delete_topic(ctx, &bootstrap, &props, &topic, timeout)
    })
}

fn list_topics(
    ctx: &OttlaContext,
    bootstrap: &str,
    props: &[(String, String)],
    timeout: Duration,
) -> Result<(Atom, Vec<(String, usize)>)> {
    let client = admin(ctx, bootstrap, props)?;
    let md = metadata(&client, None, timeout)?;
    let mut topics: Vec<(String, usize)> = md
        .topics()
        .iter()
        .filter(|t| t.error().is_none() && !t.name().starts_with("__"))
        .map(|t| (t.name().to_string(), t.partitions().len()))
        .collect();
    topics.sort();
    Ok((atoms::ok(), topics))
}

/// Answers `{:ok, [{topic, partition_count}]}`, internal topics (`__*`) left out, sorted.
#[rustler::nif]
fn admin_list_topics(
    pid: LocalPid,
    tag: u64,
    bootstrap: String,
    props: Vec<(String, String)>,
    timeout_ms: u64,
) -> Atom {
    let timeout = Duration::from_millis(timeout_ms);
    answer_call(pid, tag, move |ctx| {
        list_topics(ctx, &bootstrap, &props, timeout)
    })
}

/// Answers `{:ok, partition_count}` of `topic`, or the error saying why it is not available.
#[rustler::nif]
fn admin_partition_count(
    pid: LocalPid,
    tag: u64,
    bootstrap: String,
    props: Vec<(String, String)>,
    topic: String,
    timeout_ms: u64,
) -> Atom {
    let timeout = Duration::from_millis(timeout_ms);
    answer_call(pid, tag, move |ctx| {
        let client = admin(ctx, &bootstrap, &props)?;
        let count = crate::metadata::partition_count(client.inner(), &topic, timeout)?;
        Ok((atoms::ok(), count))
    })
}

/// Answers `{:ok, [{partition, leader_broker_id}]}` for `topic`, sorted by partition
/// (`-1` for a partition without a leader).
#[rustler::nif]
fn admin_partition_leaders(
    pid: LocalPid,
    tag: u64,
    bootstrap: String,
    props: Vec<(String, String)>,
    topic: String,
    timeout_ms: u64,
) -> Atom {
    let timeout = Duration::from_millis(timeout_ms);
    answer_call(pid, tag, move |ctx| {
        let client = admin(ctx, &bootstrap, &props)?;
        crate::metadata::partition_count(client.inner(), &topic, timeout)?;
        let md = metadata(&client, Some(&topic), timeout)?;
        let mut leaders: Vec<(i32, i32)> = md
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| (p.id(), p.leader())))
            .collect();
        leaders.sort();
        Ok((atoms::ok(), leaders))
    })
}

/// A partition and what its group committed, if anything.
type Committed = (i32, Option<i64>);

fn committed_offsets(
    ctx: &OttlaContext,
    bootstrap: &str,
    props: &[(String, String)],
    group: String,
    topic: &str,
    timeout: Duration,
) -> Result<(Atom, Vec<Committed>)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};

    let mut props = props.to_vec();
    props.push(("group.id".into(), group));
    props.push(("enable.auto.commit".into(), "false".into()));
    let consumer: BaseConsumer<OttlaContext> =
        client_config(bootstrap, &props).create_with_context(ctx.clone())?;
    let _serve = crate::context::ServeOnDrop(&consumer);
    let count = crate::metadata::partition_count(consumer.client(), topic, timeout)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..count {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, timeout)?;
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

/// Answers `{:ok, [{partition, committed_offset | nil}]}`: what consumer group `group`
/// committed for each partition of `topic` (Kafka's convention: the next offset to read).
#[rustler::nif]
fn admin_committed_offsets(
    pid: LocalPid,
    tag: u64,
    bootstrap: String,
    props: Vec<(String, String)>,
    group: String,
    topic: String,
    timeout_ms: u64,
) -> Atom {
    let timeout = Duration::from_millis(timeout_ms);
    answer_call(pid, tag, move |ctx| {
        committed_offsets(ctx, &bootstrap, &props, group, &topic, timeout)
    })
}
