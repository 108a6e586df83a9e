//! The clients that admin, fetch and metadata calls reuse, so that a call pays a request to
//! Kafka and not a whole client (connect, ApiVersions, metadata, and with TLS or SASL a
//! handshake) each time.
//!
//! A [`Clients`] holds, each created when first needed: one admin client (topic
//! administration, metadata, watermarks), a pool of fetch consumers (assigned, never in a
//! group), one consumer per group whose committed offsets were asked for, and the partition
//! counts it has learnt. A connection (`Ottla.Supervisor`) owns one and closes it with itself;
//! calls given endpoints share one per endpoints-and-config from [`cached`], closed once idle
//! for the time Elixir gives (`:endpoint_clients_idle`, 30 s by default). One thread (`ottla-clients`) serves every live client's log queue and closes
//! idle cached ones, so that nothing joins librdkafka's threads on a BEAM scheduler.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use rdkafka::admin::AdminClient;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::TopicPartitionList;
use rustler::{Atom, Encoder, Env, ResourceArc, Term};

use crate::atoms;
use crate::config::client_config;
use crate::context::{serve_main_queue, OttlaContext};
use crate::error::{Error, Result};

/// How long a learnt partition count is trusted. Creating or growing a topic through Ottla
/// forgets it at once, and a partition beyond it is asked about again before it is refused.
pub const METADATA_TTL: Duration = Duration::from_secs(30);

/// Fetch consumers kept idle per [`Clients`]; more may run at once, the rest close.
const IDLE_FETCHERS: usize = 4;

/// Groups whose offset-query consumer is kept per [`Clients`].
const GROUP_CONSUMERS: usize = 8;

/// librdkafka properties of fetch consumers, before the connection's own: what one fetch
/// prefetches beyond what it returns is bounded (librdkafka's default is 64 MiB).
/// A fetch that finds nothing new comes back at once (`fetch.wait.max.ms=0`): a fetch
/// consumer is assigned only while a call reads, and a call's first fetch would otherwise wait
/// for the last one's empty long poll. One that reached the log end between two reads of a
/// stream is paused, so it does not ask again and again.
const FETCH_DEFAULTS: &[(&str, &str)] = &[
    ("queued.max.messages.kbytes", "16384"),
    ("fetch.wait.max.ms", "0"),
];

type Consumer0 = BaseConsumer<OttlaContext>;

/// A fetch consumer and where its assignment stands: the partition and the next offset it
/// will deliver, when it is assigned, and whether that partition is paused.
pub struct Fetcher {
    pub consumer: Consumer0,
    pub at: Option<(String, i32, i64)>,
    pub paused: Option<TopicPartitionList>,
}

pub struct Clients {
    bootstrap: String,
    props: Vec<(String, String)>,
    ctx: OttlaContext,
    closed: AtomicBool,
    admin: Mutex<Option<Arc<AdminClient<OttlaContext>>>>,
    fetchers: Mutex<Vec<Fetcher>>,
    groups: Mutex<Vec<(String, Arc<Consumer0>)>>,
    counts: Mutex<HashMap<String, (i32, Instant)>>,
    last_used: Mutex<Instant>,
    /// For cached clients: how long they stay open without a call.
    idle: Option<Duration>,
    admin_created: AtomicU64,
    fetch_created: AtomicU64,
    group_created: AtomicU64,
}

type Key = (String, Vec<(String, String)>);

/// See [`Clients::fresh_admin`].
pub struct FreshAdmin(AdminClient<OttlaContext>);

impl std::ops::Deref for FreshAdmin {
    type Target = AdminClient<OttlaContext>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for FreshAdmin {
    fn drop(&mut self) {
        let client = self.0.inner();
        serve_main_queue(client.native_ptr(), client.context());
    }
}

static LIVE: Mutex<Vec<Weak<Clients>>> = Mutex::new(Vec::new());
static CACHE: OnceLock<Mutex<HashMap<Key, Arc<Clients>>>> = OnceLock::new();
static JANITOR: OnceLock<()> = OnceLock::new();

fn cache() -> &'static Mutex<HashMap<Key, Arc<Clients>>> {
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn closed() -> Error {
    Error::new("closed", "the connection's clients are closed")
}

impl Clients {
    /// Creates no librdkafka client yet: cheap enough for a normal scheduler.
    pub fn new(
        bootstrap: String,
        props: Vec<(String, String)>,
        idle: Option<Duration>,
    ) -> Arc<Self> {
        let clients = Arc::new(Clients {
            bootstrap,
            props,
            ctx: OttlaContext::default(),
            closed: AtomicBool::new(false),
            admin: Mutex::new(None),
            fetchers: Mutex::new(Vec::new()),
            groups: Mutex::new(Vec::new()),
            counts: Mutex::new(HashMap::new()),
            last_used: Mutex::new(Instant::now()),
            idle,
            admin_created: AtomicU64::new(0),
            fetch_created: AtomicU64::new(0),
            group_created: AtomicU64::new(0),
        });
        if let Ok(mut live) = LIVE.lock() {
            live.retain(|w| w.strong_count() > 0);
            live.push(Arc::downgrade(&clients));
        }
        start_janitor();
        clients
    }

    fn touch(&self) {
        if let Ok(mut at) = self.last_used.lock() {
            *at = Instant::now();
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(closed())
        } else {
            Ok(())
        }
    }

    /// The admin client, created on first use. Waits for nothing on the network (librdkafka
    /// connects in the background), but call it on a Rust thread all the same.
    pub fn admin(&self) -> Result<Arc<AdminClient<OttlaContext>>> {
        self.check_open()?;
        self.touch();
        let mut slot = self.admin.lock().map_err(|_| closed())?;
        if let Some(admin) = slot.as_ref() {
            return Ok(admin.clone());
        }
        let admin: AdminClient<OttlaContext> =
            client_config(&self.bootstrap, &self.props).create_with_context(self.ctx.clone())?;
        let admin = Arc::new(admin);
        self.admin_created.fetch_add(1, Ordering::Relaxed);
        *slot = Some(admin.clone());
        Ok(admin)
    }

    /// A new admin client with these clients' settings and context, for the caller alone (not
    /// counted in `clients_created`): it closes when dropped, after its log lines and
    /// refusals are served to the context.
    pub fn fresh_admin(&self) -> Result<FreshAdmin> {
        self.check_open()?;
        self.touch();
        let admin: AdminClient<OttlaContext> =
            client_config(&self.bootstrap, &self.props).create_with_context(self.ctx.clone())?;
        Ok(FreshAdmin(admin))
    }

    /// An idle fetch consumer, or a new one; give it back with [`Clients::give_back`].
    pub fn take_fetcher(&self) -> Result<Fetcher> {
        self.check_open()?;
        self.touch();
        if let Some(fetcher) = self.fetchers.lock().ok().and_then(|mut pool| pool.pop()) {
            return Ok(fetcher);
        }
        let mut props: Vec<(String, String)> = FETCH_DEFAULTS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        props.extend(self.props.iter().cloned());
        props.push(("group.id".into(), "ottla-fetch".into()));
        props.push(("enable.auto.commit".into(), "false".into()));
        props.push(("enable.auto.offset.store".into(), "false".into()));
        props.push(("auto.offset.reset".into(), "earliest".into()));
        let consumer: Consumer0 =
            client_config(&self.bootstrap, &props).create_with_context(self.ctx.clone())?;
        self.fetch_created.fetch_add(1, Ordering::Relaxed);
        Ok(Fetcher {
            consumer,
            at: None,
            paused: None,
        })
    }

    /// Returns a fetch consumer to the pool, its assignment stopped (so it prefetches nothing
    /// while idle). Waits on librdkafka's threads: call it on a Rust thread.
    pub fn give_back(&self, mut fetcher: Fetcher) {
        resume(&mut fetcher);
        if fetcher.at.take().is_some() {
            let _ = fetcher.consumer.unassign();
        }
        serve_main_queue(fetcher.consumer.client().native_ptr(), &self.ctx);
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        if let Ok(mut pool) = self.fetchers.lock() {
            if pool.len() < IDLE_FETCHERS {
                pool.push(fetcher);
            }
        }
    }

    /// A consumer whose `group.id` is `group` (it never joins the group: it only asks the
    /// coordinator for committed offsets), kept for the next call about the same group.
    pub fn group_consumer(&self, group: &str) -> Result<Arc<Consumer0>> {
        self.check_open()?;
        self.touch();
        let mut groups = self.groups.lock().map_err(|_| closed())?;
        if let Some(at) = groups.iter().position(|(g, _)| g == group) {
            let entry = groups.remove(at);
            let consumer = entry.1.clone();
            groups.push(entry);
            return Ok(consumer);
        }
        let mut props = self.props.clone();
        props.push(("group.id".into(), group.to_string()));
        props.push(("enable.auto.commit".into(), "false".into()));
        let consumer: Consumer0 =
            client_config(&self.bootstrap, &props).create_with_context(self.ctx.clone())?;
        self.group_created.fetch_add(1, Ordering::Relaxed);
        let consumer = Arc::new(consumer);
        if groups.len() >= GROUP_CONSUMERS {
            groups.remove(0);
        }
        groups.push((group.to_string(), consumer.clone()));
        Ok(consumer)
    }

    /// The partition count of `topic`: the one learnt less than [`METADATA_TTL`] ago, unless
    /// it is below `at_least` (a partition asked for that it does not have: perhaps the topic
    /// grew), else from a metadata request.
    pub fn partition_count(&self, topic: &str, at_least: i32, timeout: Duration) -> Result<i32> {
        if let Some(count) = self.cached_count(topic) {
            if count >= at_least {
                return Ok(count);
            }
        }
        let admin = self.admin()?;
        let result = crate::metadata::partition_count(admin.inner(), topic, timeout);
        match &result {
            Ok(count) => {
                if let Ok(mut counts) = self.counts.lock() {
                    counts.insert(topic.to_string(), (*count, Instant::now()));
                }
            }
            Err(_) => self.forget(topic),
        }
        result
    }

    fn cached_count(&self, topic: &str) -> Option<i32> {
        let counts = self.counts.lock().ok()?;
        let (count, at) = counts.get(topic)?;
        (at.elapsed() < METADATA_TTL).then_some(*count)
    }

    /// Forgets what was learnt about `topic` (after an error that may mean it is stale).
    pub fn forget(&self, topic: &str) {
        if let Ok(mut counts) = self.counts.lock() {
            counts.remove(topic);
        }
    }

    /// `err`, explained by why a broker last refused these clients (authentication, TLS), once
    /// their queued errors have been read; see [`OttlaContext::explain`].
    pub fn explain(&self, err: Error) -> Error {
        self.serve();
        self.ctx.explain(err)
    }

    /// A call succeeded: an old refusal no longer explains the next failure.
    pub fn succeeded(&self) {
        self.ctx.forget_refusal();
    }

    /// Hands queued log lines and errors of the idle clients to their context.
    fn serve(&self) {
        let admin = self.admin.lock().ok().and_then(|slot| slot.clone());
        if let Some(admin) = admin {
            serve_main_queue(admin.inner().native_ptr(), &self.ctx);
        }
        if let Ok(pool) = self.fetchers.lock() {
            for fetcher in pool.iter() {
                serve_main_queue(fetcher.consumer.client().native_ptr(), &self.ctx);
            }
        }
        let groups: Vec<Arc<Consumer0>> = match self.groups.lock() {
            Ok(groups) => groups.iter().map(|(_, c)| c.clone()).collect(),
            Err(_) => Vec::new(),
        };
        for consumer in groups {
            serve_main_queue(consumer.client().native_ptr(), &self.ctx);
        }
    }

    /// Closes every client (calls in flight finish with theirs). Joins librdkafka's threads:
    /// call it on a Rust thread.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.serve();
        let admin = self.admin.lock().ok().and_then(|mut slot| slot.take());
        let fetchers = self
            .fetchers
            .lock()
            .map(|mut pool| std::mem::take(&mut *pool))
            .unwrap_or_default();
        let groups = self
            .groups
            .lock()
            .map(|mut groups| std::mem::take(&mut *groups))
            .unwrap_or_default();
        drop((admin, fetchers, groups));
    }

    fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .map(|at| at.elapsed())
            .unwrap_or_default()
    }
}

/// The clients for calls given `bootstrap` and `props` (endpoints rather than a connection):
/// shared by every such call until no call has used them for `idle`.
pub fn cached(bootstrap: String, props: Vec<(String, String)>, idle: Duration) -> Arc<Clients> {
    let key = (bootstrap, props);
    let mut cache = match cache().lock() {
        Ok(cache) => cache,
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Some(clients) = cache.get(&key) {
        if !clients.closed.load(Ordering::Acquire) {
            clients.touch();
            return clients.clone();
        }
    }
    let clients = Clients::new(key.0.clone(), key.1.clone(), Some(idle));
    cache.insert(key, clients.clone());
    clients
}

/// After `topic` was created, grown or deleted: every client forgets its partition count.
pub fn forget_everywhere(topic: &str) {
    for clients in live() {
        clients.forget(topic);
    }
}

fn live() -> Vec<Arc<Clients>> {
    match LIVE.lock() {
        Ok(live) => live.iter().filter_map(Weak::upgrade).collect(),
        Err(_) => Vec::new(),
    }
}

fn start_janitor() {
    JANITOR.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("ottla-clients".into())
            .spawn(|| loop {
                std::thread::sleep(Duration::from_millis(500));
                janitor_turn();
            });
        if spawned.is_err() {
            eprintln!("ottla: could not start the clients' housekeeping thread");
        }
    });
}

fn janitor_turn() {
    for clients in live() {
        clients.serve();
    }
    // Idle cached clients are removed here and closed on this thread (a call still holding
    // them, a long one, finishes with the client it has).
    let expired: Vec<Arc<Clients>> = match cache().lock() {
        Ok(mut cache) => {
            let keys: Vec<Key> = cache
                .iter()
                .filter(|(_, c)| {
                    c.closed.load(Ordering::Acquire)
                        || c.idle.is_some_and(|idle| c.idle_for() >= idle)
                })
                .map(|(k, _)| k.clone())
                .collect();
            keys.iter().filter_map(|k| cache.remove(k)).collect()
        }
        Err(_) => Vec::new(),
    };
    for clients in expired {
        clients.close();
    }
}

/// A [`Clients`] held by Elixir: a connection's own, or a share of a cached one.
pub struct ClientsResource(pub Arc<Clients>);

#[rustler::resource_impl]
impl rustler::Resource for ClientsResource {}

impl Drop for ClientsResource {
    fn drop(&mut self) {
        // If this was the last holder, closing joins librdkafka's threads: not on a scheduler.
        if Arc::strong_count(&self.0) == 1 {
            let clients = self.0.clone();
            let _ = std::thread::Builder::new()
                .name("ottla-clients-close".into())
                .spawn(move || {
                    clients.close();
                    drop(clients);
                });
        }
    }
}

/// A connection's own clients (none is created before the first call needs it).
#[rustler::nif]
fn clients_new(bootstrap: String, props: Vec<(String, String)>) -> ResourceArc<ClientsResource> {
    ResourceArc::new(ClientsResource(Clients::new(bootstrap, props, None)))
}

/// The shared clients for calls given endpoints (see [`cached`]).
#[rustler::nif]
fn clients_cached(
    bootstrap: String,
    props: Vec<(String, String)>,
    idle_ms: u64,
) -> ResourceArc<ClientsResource> {
    let idle = Duration::from_millis(idle_ms);
    ResourceArc::new(ClientsResource(cached(bootstrap, props, idle)))
}

/// The bootstrap strings that have cached clients now (a test hook; touches none of them).
#[rustler::nif]
fn clients_cached_bootstraps() -> Vec<String> {
    match cache().lock() {
        Ok(cache) => cache.keys().map(|(b, _)| b.clone()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Closes a connection's clients on a thread of their own; returns at once.
#[rustler::nif]
fn clients_close(resource: ResourceArc<ClientsResource>) -> Atom {
    let clients = resource.0.clone();
    clients.closed.store(true, Ordering::Release);
    let _ = std::thread::Builder::new()
        .name("ottla-clients-close".into())
        .spawn(move || clients.close());
    atoms::ok()
}

/// Closes the cached clients of `bootstrap` (a mock cluster that stopped), on a thread.
#[rustler::nif]
fn clients_forget(bootstrap: String) -> Atom {
    let removed: Vec<Arc<Clients>> = match cache().lock() {
        Ok(mut cache) => {
            let keys: Vec<Key> = cache
                .keys()
                .filter(|(b, _)| *b == bootstrap)
                .cloned()
                .collect();
            keys.iter().filter_map(|k| cache.remove(k)).collect()
        }
        Err(_) => Vec::new(),
    };
    for clients in &removed {
        clients.closed.store(true, Ordering::Release);
    }
    if !removed.is_empty() {
        let _ = std::thread::Builder::new()
            .name("ottla-clients-close".into())
            .spawn(move || removed.iter().for_each(|c| c.close()));
    }
    atoms::ok()
}

/// `%{admin: n, fetch: n, group: n}`: how many clients of each kind these clients created
/// (a test hook: calls on one connection reuse them).
#[rustler::nif]
fn clients_created<'a>(env: Env<'a>, resource: ResourceArc<ClientsResource>) -> Term<'a> {
    let c = &resource.0;
    let pairs = [
        (
            atoms::admin().encode(env),
            c.admin_created.load(Ordering::Relaxed).encode(env),
        ),
        (
            atoms::fetch().encode(env),
            c.fetch_created.load(Ordering::Relaxed).encode(env),
        ),
        (
            atoms::group().encode(env),
            c.group_created.load(Ordering::Relaxed).encode(env),
        ),
    ];
    Term::map_from_pairs(env, &pairs).unwrap_or_else(|_| atoms::nil().encode(env))
}

/// Resumes the fetch consumer's paused partition, if it has one.
pub fn resume(fetcher: &mut Fetcher) {
    if let Some(tpl) = fetcher.paused.take() {
        let _ = fetcher.consumer.resume(&tpl);
    }
}

/// Pauses the fetch consumer's partition (it reached the log end between two reads).
pub fn pause(fetcher: &mut Fetcher, topic: &str, partition: i32) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    if fetcher.consumer.pause(&tpl).is_ok() {
        fetcher.paused = Some(tpl);
    }
}

/// Assigns a fetch consumer `topic`/`partition` from `offset` (replacing its assignment).
pub fn assign_at(fetcher: &mut Fetcher, topic: &str, partition: i32, offset: i64) -> Result<()> {
    resume(fetcher);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(offset))?;
    fetcher.consumer.assign(&tpl)?;
    fetcher.at = Some((topic.to_string(), partition, offset));
    Ok(())
}

/// An error for a partition `topic` does not have.
pub fn no_partition(topic: &str, partition: i32, count: i32) -> Error {
    Error::from_code(
        RDKafkaErrorCode::UnknownPartition,
        format!("partition {partition} does not exist: topic {topic:?} has {count}"),
    )
}
