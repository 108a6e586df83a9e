//! Kafka transactions on a connection's producer (one with a `transactional.id`).
//!
//! One thread per transactional producer (`ottla-txn`) makes every call that waits on Kafka:
//! `init_transactions` when the producer starts (which fences any older producer with the same
//! id at once), then `begin_transaction`, `commit_transaction` and `abort_transaction` for one
//! caller at a time. Callers queue in [`State::waiting`]; the one whose transaction is open
//! ([`State::open`]) is the only process whose sends the producer takes. Every answer goes to
//! the caller as `{:ottla_txn, tag, result}`.
//!
//! A caller that dies with its transaction open has it aborted (the call resource monitors
//! it). A producer fenced by a newer one stays fenced: every later call answers `code:
//! :fenced`, and it never starts again on its own (a zombie must stay down). Any other fatal
//! error is told to the process that created the producer (`{:ottla_producer_failed, error}`),
//! which restarts it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::Producer;
use rustler::{Encoder, Env, LocalPid, Monitor, NifResult, ResourceArc, Term};

use crate::atoms;
use crate::context::send_reliably;
use crate::error::{Error, Result};
use crate::producer::{ProducerResource, Shared};

/// How long one `init_transactions`, or one retry of a commit or an abort whose outcome is not
/// known yet, waits before the thread looks at its commands again.
const STEP: Duration = Duration::from_secs(2);
/// How long the abort of a dead caller's transaction, or of the open one at close, may take.
const CLEANUP: Duration = Duration::from_secs(10);

pub struct Txn {
    state: RwLock<State>,
    commands: Mutex<Sender<Command>>,
    /// Told of a fatal error other than fencing: the connection, which restarts the producer.
    notify: LocalPid,
    next_id: AtomicU64,
}

pub struct State {
    phase: Phase,
    /// The transaction being built: only its owner's sends are taken.
    open: Option<Open>,
    waiting: VecDeque<Caller>,
}

enum Phase {
    /// `init_transactions` has not succeeded yet: callers wait.
    Initializing,
    Ready,
    /// Fenced by a newer producer with the same transactional id, or failed: final.
    Stopped(Error),
}

#[derive(Clone, Copy)]
struct Caller {
    id: u64,
    pid: LocalPid,
    tag: u64,
}

type Open = Caller;

enum Command {
    /// Someone joined the queue.
    Kick,
    /// Commit or abort `caller`'s transaction, answering it.
    Finish {
        caller: Caller,
        commit: bool,
        timeout: Duration,
    },
    Stop,
}

/// One `Ottla.transaction` call: monitors its caller.
pub struct TxnCall {
    producer: ResourceArc<ProducerResource>,
    caller: Caller,
}

#[rustler::resource_impl]
impl rustler::Resource for TxnCall {
    const IMPLEMENTS_DOWN: bool = true;

    fn down<'a>(&'a self, _env: Env<'a>, _pid: LocalPid, _monitor: Monitor) {
        let Some(txn) = self.producer.txn() else {
            return;
        };
        let open = {
            let mut state = txn.write();
            state.waiting.retain(|c| c.id != self.caller.id);
            state.open.is_some_and(|o| o.id == self.caller.id)
        };
        if open {
            txn.command(Command::Finish {
                caller: self.caller,
                commit: false,
                timeout: CLEANUP,
            });
        }
    }
}

fn fenced(reason: &str) -> Error {
    Error::new(
        "fenced",
        format!(
            "this producer was fenced by a newer one with the same transactional id, and stays \
             stopped: {reason}"
        ),
    )
}

fn is_fenced(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
    )
}

/// What a failed transactional call means.
enum Outcome {
    /// Not known yet (a timeout): the same call may be made again.
    Unknown(Error),
    /// The transaction cannot commit; it must be aborted.
    Abort(Error),
    /// The producer cannot go on.
    Fatal(Error),
}

fn outcome(client: &crate::producer::Client, err: KafkaError) -> Outcome {
    if let Some((code, reason)) = client.client().fatal_error() {
        return Outcome::Fatal(if is_fenced(code) {
            fenced(&reason)
        } else {
            Error::from_code(code, format!("the producer failed: {reason}"))
        });
    }
    match &err {
        KafkaError::Transaction(e) if is_fenced(e.code()) => Outcome::Fatal(fenced(&e.string())),
        KafkaError::Transaction(e) if e.is_fatal() => Outcome::Fatal(Error::from(err)),
        KafkaError::Transaction(e) if e.txn_requires_abort() => Outcome::Abort(Error::from(err)),
        KafkaError::Transaction(e) if e.is_retriable() => Outcome::Unknown(Error::from(err)),
        // rdkafka flushes before it commits; a flush that timed out leaves the commit to do.
        KafkaError::Flush(_) => Outcome::Unknown(Error::from(err)),
        _ => Outcome::Abort(Error::from(err)),
    }
}

fn reply(caller: &Caller, result: Result<u64>) {
    let tag = caller.tag;
    send_reliably(
        &caller.pid,
        Box::new(move |env| {
            let result = match result {
                Ok(id) => (atoms::ok(), id).encode(env),
                Err(error) => (atoms::error(), error).encode(env),
            };
            (atoms::ottla_txn(), tag, result).encode(env)
        }),
    );
}

impl Txn {
    /// A transactional producer's state, and its thread (`commands` is its end of the queue).
    pub fn start(shared: &Arc<Shared>, notify: LocalPid) -> Result<Arc<Txn>> {
        let (commands, queue) = std::sync::mpsc::channel();
        let txn = Arc::new(Txn {
            state: RwLock::new(State {
                phase: Phase::Initializing,
                open: None,
                waiting: VecDeque::new(),
            }),
            commands: Mutex::new(commands),
            notify,
            next_id: AtomicU64::new(1),
        });
        let (thread_shared, thread_txn) = (shared.clone(), txn.clone());
        std::thread::Builder::new()
            .name("ottla-txn".into())
            .spawn(move || run(thread_shared, thread_txn, queue))
            .map_err(|e| Error::new("thread_spawn", format!("could not start a thread: {e}")))?;
        Ok(txn)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// False once the thread has ended.
    fn command(&self, command: Command) -> bool {
        match self.commands.lock() {
            Ok(commands) => commands.send(command).is_ok(),
            Err(_) => false,
        }
    }

    /// The producer is closing: the thread aborts what is open and ends.
    pub fn stop(&self) {
        self.command(Command::Stop);
    }

    fn stopped(&self) -> Option<Error> {
        match &self.read().phase {
            Phase::Stopped(error) => Some(error.clone()),
            _ => None,
        }
    }

    /// Lets a send of transaction `id` by `pid` through, holding the state so that the
    /// transaction cannot end while the message is handed to librdkafka; an error for a send
    /// outside the open transaction (it would join someone else's, or none).
    pub fn admit(&self, id: u64, pid: &LocalPid) -> Result<RwLockReadGuard<'_, State>> {
        let state = self.read();
        if let Phase::Stopped(error) = &state.phase {
            return Err(error.clone());
        }
        match state.open {
            Some(open) if open.id == id && *pid == open.pid => Ok(state),
            _ => Err(Error::new(
                "not_in_transaction",
                "a transactional producer takes messages only inside Ottla.transaction/3 \
                 (this transaction has ended, or the process does not own it)",
            )),
        }
    }

    /// Marks the producer stopped for good, and tells every waiting caller.
    fn stop_with(&self, error: Error) {
        let waiting: Vec<Caller> = {
            let mut state = self.write();
            if matches!(state.phase, Phase::Stopped(_)) {
                return;
            }
            state.phase = Phase::Stopped(error.clone());
            state.open = None;
            state.waiting.drain(..).collect()
        };
        for caller in &waiting {
            reply(caller, Err(error.clone()));
        }
        if error.code != "fenced" && error.code != "closed" {
            crate::context::log(
                atoms::error(),
                "TXN",
                &format!("the transactional producer failed: {}", error.message),
            );
            let notify = self.notify;
            send_reliably(
                &notify,
                Box::new(move |env| (atoms::ottla_producer_failed(), error).encode(env)),
            );
        }
    }

    /// Opens the next waiting caller's transaction, if none is open.
    fn start_next(&self, shared: &Shared) {
        let Ok(client) = shared.client() else {
            return;
        };
        let mut state = self.write();
        while matches!(state.phase, Phase::Ready) && state.open.is_none() {
            let Some(caller) = state.waiting.pop_front() else {
                return;
            };
            // Under the lock, with the reply: a caller that gives up waiting finds its
            // transaction either still queued or open, never in between.
            match client.begin_transaction() {
                Ok(()) => {
                    state.open = Some(caller);
                    reply(&caller, Ok(caller.id));
                }
                Err(err) => match outcome(&client, err) {
                    Outcome::Fatal(error) => {
                        state.waiting.push_front(caller);
                        drop(state);
                        self.stop_with(error);
                        return;
                    }
                    Outcome::Unknown(error) | Outcome::Abort(error) => {
                        reply(&caller, Err(error));
                    }
                },
            }
        }
    }

    /// Commits or aborts `caller`'s transaction (if it is the open one), answering it.
    fn finish(&self, shared: &Shared, caller: Caller, commit: bool, timeout: Duration) {
        let open = {
            let mut state = self.write();
            match state.open {
                Some(open) if open.id == caller.id => state.open.take(),
                _ => None,
            }
        };
        if open.is_none() {
            let error = self.stopped().unwrap_or_else(|| {
                Error::new("not_in_transaction", "this transaction is no longer open")
            });
            return reply(&caller, Err(error));
        }
        let id = caller.id;
        let client = match shared.client() {
            Ok(client) => client,
            Err(error) => return reply(&caller, Err(error)),
        };
        // rdkafka's commit flushes, then commits, each with the timeout given: one budget here.
        let deadline = crate::reply::deadline_after(timeout);
        let left = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        let result = if commit {
            client
                .flush(timeout)
                .and_then(|()| client.commit_transaction(left()))
        } else {
            client.abort_transaction(timeout)
        };
        let Err(err) = result else {
            return reply(&caller, Ok(id));
        };
        match outcome(&client, err) {
            Outcome::Fatal(error) => {
                reply(&caller, Err(error.clone()));
                self.stop_with(error);
            }
            Outcome::Abort(error) => {
                let aborted = self.resolve(shared, false);
                let error = match aborted {
                    Ok(()) => Error {
                        message: format!("the transaction was aborted: {}", error.message),
                        ..error
                    },
                    Err(other) => other,
                };
                reply(&caller, Err(error));
            }
            Outcome::Unknown(error) => {
                // The outcome is not known yet: the caller hears so, and the thread sees the
                // commit (or abort) through before any other transaction begins.
                let in_doubt = Error {
                    code: "timed_out".into(),
                    message: format!(
                        "the transaction did not finish within {} ms and is still being {}; \
                         its messages may yet become visible: {}",
                        timeout.as_millis(),
                        if commit { "committed" } else { "aborted" },
                        error.message
                    ),
                    retriable: true,
                    possibly_persisted: commit,
                };
                reply(&caller, Err(in_doubt));
                let _ = self.resolve(shared, commit);
            }
        }
    }

    /// Repeats a commit (or an abort) until librdkafka knows its outcome, the producer stops
    /// or closes. A commit that turns out to need an abort is aborted.
    fn resolve(&self, shared: &Shared, mut commit: bool) -> Result<()> {
        loop {
            let client = shared.client()?;
            let result = if commit {
                client.commit_transaction(STEP)
            } else {
                client.abort_transaction(STEP)
            };
            let Err(err) = result else {
                return Ok(());
            };
            match outcome(&client, err) {
                Outcome::Unknown(_) => continue,
                Outcome::Abort(error) if !commit => {
                    self.stop_with(error.clone());
                    return Err(error);
                }
                Outcome::Abort(_) => commit = false,
                Outcome::Fatal(error) => {
                    self.stop_with(error.clone());
                    return Err(error);
                }
            }
        }
    }
}

/// The transaction thread: initialises, then serves one caller at a time until the producer
/// closes.
fn run(shared: Arc<Shared>, txn: Arc<Txn>, queue: Receiver<Command>) {
    let closed = || Error::new("closed", "the producer is closed");
    // init_transactions, a step at a time, so that a close is seen while the cluster is away.
    loop {
        let Ok(client) = shared.client() else {
            return txn.stop_with(closed());
        };
        match client.init_transactions(STEP) {
            Ok(()) => {
                txn.write().phase = Phase::Ready;
                break;
            }
            Err(err) => match outcome(&client, err) {
                Outcome::Unknown(_) => {}
                Outcome::Abort(error) | Outcome::Fatal(error) => {
                    txn.stop_with(error);
                    break;
                }
            },
        }
        while let Ok(command) = queue.try_recv() {
            if matches!(command, Command::Stop) {
                return txn.stop_with(closed());
            }
        }
    }
    loop {
        txn.start_next(&shared);
        match queue.recv() {
            Ok(Command::Kick) => {}
            Ok(Command::Finish {
                caller,
                commit,
                timeout,
            }) => txn.finish(&shared, caller, commit, timeout),
            Ok(Command::Stop) | Err(_) => {
                let open = txn.read().open;
                if let Some(caller) = open {
                    txn.finish(&shared, caller, false, CLEANUP);
                }
                return txn.stop_with(closed());
            }
        }
    }
}

fn txn_of(producer: &ProducerResource) -> Result<&Arc<Txn>> {
    producer.txn().ok_or_else(|| {
        Error::new(
            "not_transactional",
            "the connection's producer has no transactional id",
        )
    })
}

/// Queues the caller for a transaction on `producer`: `{:ok, call}` now, then
/// `{:ottla_txn, tag, {:ok, id} | {:error, %Ottla.Error{}}}` once its transaction is open (or
/// cannot be). Never waits.
#[rustler::nif]
fn transaction_begin<'a>(
    env: Env<'a>,
    producer: ResourceArc<ProducerResource>,
    tag: u64,
) -> NifResult<Term<'a>> {
    let pid = env.pid();
    let txn = txn_of(&producer)?.clone();
    let id = txn.next_id.fetch_add(1, Ordering::Relaxed);
    {
        let mut state = txn.write();
        if let Phase::Stopped(error) = &state.phase {
            return Err(error.clone().into());
        }
        state.waiting.push_back(Caller { id, pid, tag });
    }
    let call = ResourceArc::new(TxnCall {
        producer: producer.clone(),
        caller: Caller { id, pid, tag },
    });
    // A caller that is already dead cannot be: its place in the queue goes.
    if env.monitor(&call, &pid).is_none() {
        txn.write().waiting.retain(|c| c.id != id);
        return Err(Error::new("noproc", "the calling process is not alive").into());
    }
    txn.command(Command::Kick);
    Ok((atoms::ok(), call).encode(env))
}

/// The caller stopped waiting for its transaction to open: `:cancelled` if it was still
/// queued (nothing more arrives), `:open` if it had opened (its `{:ok, id}` is in the caller's
/// mailbox: the caller aborts it), `:gone` if it was refused (its error is in the mailbox).
#[rustler::nif]
fn transaction_cancel(call: ResourceArc<TxnCall>) -> NifResult<rustler::Atom> {
    let txn = txn_of(&call.producer)?;
    let mut state = txn.write();
    let before = state.waiting.len();
    state.waiting.retain(|c| c.id != call.caller.id);
    if state.waiting.len() < before {
        Ok(atoms::cancelled())
    } else if state.open.is_some_and(|o| o.id == call.caller.id) {
        Ok(atoms::open())
    } else {
        Ok(atoms::gone())
    }
}

/// Commits (`commit: true`) or aborts the caller's open transaction on the transaction
/// thread, within `timeout_ms`: `:ok`, then `{:ottla_txn, tag, {:ok, id} | {:error,
/// %Ottla.Error{}}}`; or `{:error, %Ottla.Error{}}` at once when the producer has stopped.
#[rustler::nif]
fn transaction_finish(
    call: ResourceArc<TxnCall>,
    commit: bool,
    timeout_ms: u64,
) -> NifResult<rustler::Atom> {
    let txn = txn_of(&call.producer)?;
    if let Some(error) = txn.stopped() {
        return Err(error.into());
    }
    let sent = txn.command(Command::Finish {
        caller: call.caller,
        commit,
        timeout: Duration::from_millis(timeout_ms.max(1)),
    });
    if !sent {
        return Err(Error::new("closed", "the producer is closed").into());
    }
    Ok(atoms::ok())
}
