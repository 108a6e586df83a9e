//! Kafka transactions on a connection's producer (one with a `transactional.id`).
//!
//! One thread per transactional producer (`ottla-txn`) makes every call that waits on Kafka:
//! `init_transactions` when the producer starts (which fences any older producer with the same
//! id at once), then `begin_transaction`, `commit_transaction` and `abort_transaction` for one
//! caller at a time. Callers queue in [`State::waiting`]; the one whose transaction is open
//! ([`State::open`]) is the only process whose sends the producer takes. Every answer goes to
//! the caller as `{:ottla_txn, tag, result}`, sent under the state's lock: a caller that finds
//! its transaction neither queued nor open has its answer in its mailbox already.
//!
//! A caller that dies with its transaction open has it aborted (the call resource monitors
//! it). A transaction open for longer than [`EXPIRY_SHARE`] of `transaction.timeout.ms` is
//! aborted here: the coordinator would otherwise time it out and bump the producer's epoch,
//! which librdkafka reports exactly as fencing. A producer fenced by a newer one stays fenced:
//! every later call answers `code: :fenced`, and it never starts again on its own (a zombie
//! must stay down). Any other fatal error is told to the process that created the producer
//! (`{:ottla_producer_failed, error}`), which restarts it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::Producer;
use rustler::{Encoder, Env, LocalPid, Monitor, NifResult, ResourceArc, Term};

use crate::atoms;
use crate::context::send_reliably;
use crate::error::{Error, Result};
use crate::producer::{Client, ProducerResource, Shared};

/// How long one `init_transactions`, or one retry of a commit or an abort whose outcome is not
/// known yet, waits before the thread looks at its commands again.
const STEP: Duration = Duration::from_secs(2);
/// How long the abort of a dead caller's or an expired transaction, or the producer's close,
/// may take.
pub const CLEANUP: Duration = Duration::from_secs(10);
/// The share of `transaction.timeout.ms` a transaction may stay open.
const EXPIRY_SHARE: f64 = 0.8;

pub struct Txn {
    state: RwLock<State>,
    commands: Mutex<Sender<Command>>,
    /// Told of a fatal error other than fencing: the connection, which restarts the producer.
    notify: LocalPid,
    next_id: AtomicU64,
    /// How long a transaction may stay open before it is aborted here.
    expiry: Duration,
    /// The producer is closing: a commit being retried gets one last try.
    closing: AtomicBool,
}

pub struct State {
    phase: Phase,
    /// The transaction being built: only its owner's sends are taken.
    open: Option<Open>,
    /// The caller whose transaction librdkafka is beginning, and whether it gave up meanwhile.
    beginning: Option<(Caller, bool)>,
    waiting: VecDeque<Caller>,
    /// The last transaction aborted because it stayed open too long, with the error its owner
    /// gets when it comes to finish it.
    expired: Option<(u64, Error)>,
}

enum Phase {
    /// `init_transactions` has not succeeded yet: callers wait.
    Initializing,
    Ready,
    /// Fenced by a newer producer with the same transactional id, failed, or closed: final.
    Stopped(Error),
}

#[derive(Clone, Copy)]
struct Caller {
    id: u64,
    pid: LocalPid,
    tag: u64,
    /// An exactly-once consumer's batch: its transaction may be shared with the other
    /// batches ready at the same time (they commit or abort together).
    share: bool,
}

struct Open {
    /// The caller it was opened for; its id is the transaction's.
    caller: Caller,
    since: Instant,
    /// Sharing callers that joined it while it was open (`Caller::share`).
    joined: Vec<Caller>,
    /// Sharing members that came to finish (with their batches), or died: the transaction
    /// ends once every member is here.
    finished: Vec<(Caller, Option<Batch>)>,
    /// Why it cannot commit: a member asked for an abort, or died.
    failed: Option<Error>,
    /// A member came to finish: no one joins any more.
    sealed: bool,
}

impl Open {
    fn new(caller: Caller) -> Self {
        Open {
            caller,
            since: Instant::now(),
            joined: Vec::new(),
            finished: Vec::new(),
            failed: None,
            sealed: false,
        }
    }

    fn member(&self, id: u64) -> Option<Caller> {
        std::iter::once(&self.caller)
            .chain(self.joined.iter())
            .find(|c| c.id == id)
            .copied()
    }

    fn has_pid(&self, pid: &LocalPid) -> bool {
        self.caller.pid == *pid || self.joined.iter().any(|c| c.pid == *pid)
    }

    /// Whether a sharing caller may join now.
    fn open_to(&self, caller: &Caller) -> bool {
        caller.share && self.caller.share && !self.sealed
    }

    /// A sharing member is done (finishing, or dead); true once every member is.
    fn arrive(&mut self, caller: Caller, batch: Option<Batch>, failure: Option<Error>) -> bool {
        self.sealed = true;
        if !self.finished.iter().any(|(c, _)| c.id == caller.id) {
            if let Some(error) = failure {
                self.failed.get_or_insert(error);
            }
            self.finished.push((caller, batch));
        }
        self.finished.len() > self.joined.len()
    }
}

enum Command {
    /// Someone joined the queue.
    Kick,
    /// Commit or abort `caller`'s transaction, answering it.
    Finish {
        caller: Caller,
        commit: bool,
        timeout: Duration,
        /// An exactly-once consumer's batch, whose offsets commit with the transaction.
        batch: Option<Batch>,
    },
    /// The owner of transaction `id` died: abort it.
    Abandon { id: u64 },
    /// The producer is closing: abort what is open, answer what is left, tell `done`.
    Stop { done: Sender<()> },
}

/// An exactly-once consumer's batch of one partition: delivered at `generation`, from offset
/// `first`; its transaction commits `next` as the group's offset (KIP-447).
pub struct Batch {
    consumer: Arc<crate::consumer::Shared>,
    tp: (String, i32),
    generation: i32,
    first: i64,
    next: i64,
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
        let id = self.caller.id;
        let open = {
            let mut state = txn.write();
            state.waiting.retain(|c| c.id != id);
            if let Some((caller, gave_up)) = state.beginning.as_mut() {
                if caller.id == id {
                    *gave_up = true;
                }
            }
            state.open.as_ref().is_some_and(|o| o.member(id).is_some())
        };
        if open {
            txn.command(Command::Abandon { id });
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

fn closed() -> Error {
    Error::new("closed", "the producer is closed")
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

fn outcome(client: &Client, err: KafkaError) -> Outcome {
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

/// Sends `caller` its answer. Callers hold the state's write lock (see the module doc).
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
    /// A transactional producer's state, and its thread.
    pub fn start(shared: &Arc<Shared>, notify: LocalPid, timeout: Duration) -> Result<Arc<Txn>> {
        let (commands, queue) = std::sync::mpsc::channel();
        let txn = Arc::new(Txn {
            state: RwLock::new(State {
                phase: Phase::Initializing,
                open: None,
                beginning: None,
                waiting: VecDeque::new(),
                expired: None,
            }),
            commands: Mutex::new(commands),
            notify,
            next_id: AtomicU64::new(1),
            expiry: timeout.mul_f64(EXPIRY_SHARE),
            closing: AtomicBool::new(false),
        });
        let (thread_shared, thread_txn) = (shared.clone(), txn.clone());
        std::thread::Builder::new()
            .name("ottla-txn".into())
            .spawn(move || {
                let guard = thread_txn.clone();
                let run = move || run(thread_shared, thread_txn, queue);
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).is_err() {
                    guard.stop_with(Error::new(
                        "internal",
                        "the transaction thread failed inside the NIF",
                    ));
                }
            })
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

    /// The producer is closing (called on the closing thread, never a scheduler): the thread
    /// aborts what is open, answers everyone, and ends; waits for that up to [`CLEANUP`] and
    /// a little more. (The thread holds a client of its own until it ends.)
    pub fn stop(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let (done, finished) = std::sync::mpsc::channel();
        if self.command(Command::Stop { done }) {
            let _ = finished.recv_timeout(CLEANUP + STEP);
        }
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
        match (&state.open, &state.expired) {
            (Some(open), _) if open.caller.id == id && open.has_pid(pid) => Ok(state),
            (_, Some((expired, error))) if *expired == id => Err(error.clone()),
            _ => Err(Error::new(
                "not_in_transaction",
                "a transactional producer takes messages only inside Ottla.transaction/3 \
                 (this transaction has ended, or the process does not own it)",
            )),
        }
    }

    /// Marks the producer stopped for good, and tells every waiting caller.
    fn stop_with(&self, error: Error) {
        {
            let mut state = self.write();
            if matches!(state.phase, Phase::Stopped(_)) {
                return;
            }
            state.phase = Phase::Stopped(error.clone());
            if let Some(open) = state.open.take() {
                for (caller, _) in &open.finished {
                    reply(caller, Err(error.clone()));
                }
            }
            for caller in state.waiting.drain(..) {
                reply(&caller, Err(error.clone()));
            }
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

    /// Opens the next waiting callers' transactions, one at a time, while none is open.
    fn start_next(&self, client: &Client) {
        loop {
            let caller = {
                let mut state = self.write();
                if !matches!(state.phase, Phase::Ready) || state.open.is_some() {
                    return;
                }
                let Some(caller) = state.waiting.pop_front() else {
                    return;
                };
                state.beginning = Some((caller, false));
                caller
            };
            // Outside the lock: librdkafka's main thread does the work.
            let begun = client.begin_transaction();
            let mut state = self.write();
            let gave_up = state.beginning.take().is_some_and(|(_, gave_up)| gave_up);
            match begun {
                Ok(()) if gave_up => {
                    drop(state);
                    // Nothing was produced in it: aborting is local and quick.
                    if let Err(err) = client.abort_transaction(CLEANUP) {
                        if let Outcome::Fatal(error) = outcome(client, err) {
                            self.stop_with(error);
                        }
                    }
                }
                Ok(()) => {
                    let mut open = Open::new(caller);
                    reply(&caller, Ok(caller.id));
                    // Every sharing caller waiting now joins it.
                    if caller.share {
                        let (joining, rest) = state.waiting.drain(..).partition(|c| c.share);
                        state.waiting = rest;
                        open.joined = joining.into();
                        for c in &open.joined {
                            reply(c, Ok(caller.id));
                        }
                    }
                    state.open = Some(open);
                }
                Err(err) => match outcome(client, err) {
                    Outcome::Fatal(error) => {
                        if !gave_up {
                            state.waiting.push_front(caller);
                        }
                        drop(state);
                        self.stop_with(error);
                        return;
                    }
                    Outcome::Unknown(error) | Outcome::Abort(error) => {
                        if !gave_up {
                            reply(&caller, Err(error));
                        }
                    }
                },
            }
        }
    }

    /// How long the open transaction may stay open still.
    fn until_expiry(&self) -> Option<Duration> {
        let state = self.read();
        let open = state.open.as_ref()?;
        Some(self.expiry.saturating_sub(open.since.elapsed()))
    }

    /// Takes the open transaction out if it is `id`'s: no send joins it any more.
    fn take_open(&self, id: u64) -> Option<Caller> {
        let mut state = self.write();
        match &state.open {
            Some(open) if open.caller.id == id => {
                let open = state.open.take()?;
                // Sharing members that came to finish hear that it ended without them.
                for (caller, _) in &open.finished {
                    reply(
                        caller,
                        Err(Error::new(
                            "not_in_transaction",
                            "the transaction was aborted",
                        )),
                    );
                }
                Some(open.caller)
            }
            _ => None,
        }
    }

    /// Aborts the open transaction: it stayed open too long. Its owner hears why when it
    /// comes to finish it.
    fn expire(&self, client: &Client) {
        let open = self
            .read()
            .open
            .as_ref()
            .filter(|o| o.since.elapsed() >= self.expiry)
            .map(|o| o.caller.id);
        let Some(open) = open else {
            return;
        };
        let Some(caller) = self.take_open(open) else {
            return;
        };
        let error = Error::new(
            "timed_out",
            format!(
                "the transaction was open for more than {} ms ({:.0}% of transaction.timeout.ms) \
                 and was aborted",
                self.expiry.as_millis(),
                EXPIRY_SHARE * 100.0
            ),
        );
        {
            let mut state = self.write();
            state.expired = Some((caller.id, error));
        }
        self.abort(client);
    }

    /// Aborts what was taken out of [`State::open`], with no one to answer.
    fn abort(&self, client: &Client) {
        if let Err(err) = client.abort_transaction(CLEANUP) {
            match outcome(client, err) {
                Outcome::Fatal(error) => self.stop_with(error),
                _ => {
                    let _ = self.resolve(client, false);
                }
            }
        }
    }

    /// Commits or aborts `caller`'s transaction (if it is the open one), answering it.
    fn finish(
        &self,
        client: &Client,
        caller: Caller,
        commit: bool,
        timeout: Duration,
        batch: Option<Batch>,
    ) {
        if caller.share {
            return self.finish_shared(client, caller, commit, timeout, batch);
        }
        if self.take_open(caller.id).is_none() {
            let state = self.write();
            let error = match (&state.phase, &state.expired) {
                (Phase::Stopped(error), _) => error.clone(),
                (_, Some((id, error))) if *id == caller.id => error.clone(),
                _ => Error::new("not_in_transaction", "this transaction is no longer open"),
            };
            return reply(&caller, Err(error));
        }
        // rdkafka's commit flushes, then commits, each with the timeout given: one budget here.
        let deadline = crate::reply::deadline_after(timeout);
        let left = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        // A batch that may no longer commit (see `consumer::transaction_check`) aborts.
        let checked = match (&batch, commit) {
            (Some(b), true) => Some(crate::consumer::transaction_check(
                &b.consumer,
                &b.tp,
                b.generation,
                b.first,
                b.next,
            )),
            _ => None,
        };
        let mut refusal = checked.as_ref().and_then(|c| c.as_ref().err().cloned());
        let mut commit_now = commit && refusal.is_none();
        let result = if commit_now {
            client.flush(timeout).and_then(|()| {
                if let (Some(b), Some(Ok(metadata))) = (&batch, &checked) {
                    // Offsets that could not be sent (a rebalance under way, a coordinator
                    // moving): the transaction aborts, and its batch comes again. Committing
                    // after a failed send is refused by the broker as an invalid state,
                    // which librdkafka takes as fatal.
                    if let Err(err) = send_offsets(client, b, metadata, left()) {
                        refusal = Some(Error {
                            message: format!(
                                "the batch's offsets could not be sent to the transaction: {}",
                                err.message
                            ),
                            ..err
                        });
                        commit_now = false;
                        return client.abort_transaction(left());
                    }
                }
                client.commit_transaction(left())
            })
        } else {
            client.abort_transaction(timeout)
        };
        let answer = |result: Result<u64>| {
            let _state = self.write();
            reply(&caller, result);
        };
        let aborted = || {
            if let Some(b) = &batch {
                crate::consumer::transaction_aborted(&b.consumer);
            }
        };
        let Err(err) = result else {
            if let Some(error) = refusal {
                aborted();
                return answer(Err(error));
            }
            match (commit_now, &batch) {
                (true, Some(b)) => {
                    crate::consumer::transaction_committed(&b.consumer, &b.tp, b.generation, b.next)
                }
                (false, Some(_)) => aborted(),
                _ => {}
            }
            return answer(Ok(caller.id));
        };
        match outcome(client, err) {
            Outcome::Fatal(error) => {
                aborted();
                answer(Err(error.clone()));
                self.stop_with(error);
            }
            Outcome::Abort(error) => {
                aborted();
                // Not visible, whatever follows: the abort is seen through before any other
                // transaction begins.
                answer(Err(Error {
                    message: format!("the transaction was aborted: {}", error.message),
                    ..error
                }));
                let _ = self.resolve(client, false);
            }
            Outcome::Unknown(error) => {
                // The outcome is not known yet: the caller hears so, and the thread sees the
                // commit (or abort) through before any other transaction begins.
                answer(Err(Error {
                    code: "timed_out".into(),
                    message: format!(
                        "the transaction did not finish within {} ms and is still being {}; \
                         its messages may yet become visible: {}",
                        timeout.as_millis(),
                        if commit_now { "committed" } else { "aborted" },
                        error.message
                    ),
                    retriable: true,
                    possibly_persisted: commit_now,
                }));
                // A batch whose commit went through after all is acked, as on a commit in
                // time: its worker heard `timed_out` and retries, and finds it committed.
                match (self.resolve(client, commit_now), &batch) {
                    (Ok(true), Some(b)) => crate::consumer::transaction_committed(
                        &b.consumer,
                        &b.tp,
                        b.generation,
                        b.next,
                    ),
                    (_, Some(_)) => aborted(),
                    _ => {}
                }
            }
        }
    }

    /// A sharing member came to finish: the shared transaction ends once every member did.
    fn finish_shared(
        &self,
        client: &Client,
        caller: Caller,
        commit: bool,
        timeout: Duration,
        batch: Option<Batch>,
    ) {
        let ended = {
            let mut state = self.write();
            let Some(open) = state
                .open
                .as_mut()
                .filter(|o| o.member(caller.id).is_some())
            else {
                reply(
                    &caller,
                    Err(Error::new(
                        "not_in_transaction",
                        "this transaction is no longer open",
                    )),
                );
                return;
            };
            let failure = (!commit).then(|| {
                Error::new(
                    "aborted",
                    "a batch in the same transaction failed, so it was aborted",
                )
            });
            if !open.arrive(caller, batch, failure) {
                return;
            }
            state.open.take()
        };
        if let Some(open) = ended {
            self.end_shared(client, open, timeout);
        }
    }

    /// Commits a shared transaction with every member's batch (or aborts it, when one failed
    /// or may not commit), and answers every member.
    fn end_shared(&self, client: &Client, open: Open, timeout: Duration) {
        let Open {
            caller: owner,
            finished: members,
            failed,
            ..
        } = open;
        let deadline = crate::reply::deadline_after(timeout);
        let left = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        let mut failure = failed;
        let mut refused: Vec<Option<Error>> = vec![None; members.len()];
        let mut metadata = Vec::with_capacity(members.len());
        for (i, (_, batch)) in members.iter().enumerate() {
            let checked = match (&failure, batch) {
                (None, Some(b)) => crate::consumer::transaction_check(
                    &b.consumer,
                    &b.tp,
                    b.generation,
                    b.first,
                    b.next,
                )
                .map(Some),
                _ => Ok(None),
            };
            match checked {
                Ok(m) => metadata.push(m),
                Err(error) => {
                    refused[i] = Some(error);
                    failure.get_or_insert_with(|| {
                        Error::new(
                            "aborted",
                            "a batch in the same transaction was committed already or moved \
                             on, so it was aborted",
                        )
                    });
                    metadata.push(None);
                }
            }
        }
        let commit = failure.is_none();
        let result = if commit {
            client.flush(timeout).and_then(|()| {
                for ((_, batch), m) in members.iter().zip(&metadata) {
                    if let (Some(b), Some(m)) = (batch, m) {
                        if let Err(err) = send_offsets(client, b, m, left()) {
                            failure = Some(Error {
                                message: format!(
                                    "the batches' offsets could not be sent to the \
                                     transaction: {}",
                                    err.message
                                ),
                                ..err
                            });
                            return client.abort_transaction(left());
                        }
                    }
                }
                client.commit_transaction(left())
            })
        } else {
            client.abort_transaction(timeout)
        };
        let committed = commit && failure.is_none();
        let answer_all = |answer: &dyn Fn(usize) -> Result<u64>| {
            let _state = self.write();
            for (i, (caller, _)) in members.iter().enumerate() {
                reply(caller, answer(i));
            }
        };
        let each_batch = |f: &dyn Fn(&Batch)| {
            for (_, batch) in &members {
                if let Some(b) = batch {
                    f(b);
                }
            }
        };
        let aborted = || each_batch(&|b| crate::consumer::transaction_aborted(&b.consumer));
        let done = || {
            each_batch(&|b| {
                crate::consumer::transaction_committed(&b.consumer, &b.tp, b.generation, b.next)
            })
        };
        let why = |i: usize, error: &Error| refused[i].clone().unwrap_or_else(|| error.clone());
        match result {
            Ok(()) if committed => {
                done();
                answer_all(&|_| Ok(owner.id));
            }
            Ok(()) => {
                aborted();
                let error = failure
                    .clone()
                    .unwrap_or_else(|| Error::new("aborted", "aborted"));
                answer_all(&|i| Err(why(i, &error)));
            }
            Err(err) => match outcome(client, err) {
                Outcome::Fatal(error) => {
                    aborted();
                    answer_all(&|_| Err(error.clone()));
                    self.stop_with(error);
                }
                Outcome::Abort(error) => {
                    aborted();
                    let error = Error {
                        message: format!("the transaction was aborted: {}", error.message),
                        ..error
                    };
                    answer_all(&|i| Err(why(i, &error)));
                    let _ = self.resolve(client, false);
                }
                Outcome::Unknown(error) => {
                    let error = Error {
                        code: "timed_out".into(),
                        message: format!(
                            "the transaction did not finish within {} ms and is still being \
                             {}: {}",
                            timeout.as_millis(),
                            if committed { "committed" } else { "aborted" },
                            error.message
                        ),
                        retriable: true,
                        possibly_persisted: committed,
                    };
                    answer_all(&|_| Err(error.clone()));
                    match self.resolve(client, committed) {
                        Ok(true) => done(),
                        _ => aborted(),
                    }
                }
            },
        }
    }

    /// Repeats a commit (or an abort) until librdkafka knows its outcome or the producer
    /// stops; once it is closing, for one last [`CLEANUP`]. A commit that turns out to need
    /// an abort is aborted.
    /// Answers whether it committed.
    fn resolve(&self, client: &Client, mut commit: bool) -> Result<bool> {
        let mut last_try: Option<Instant> = None;
        loop {
            if self.closing.load(Ordering::SeqCst) {
                let since = *last_try.get_or_insert_with(Instant::now);
                if since.elapsed() >= CLEANUP {
                    return Err(closed());
                }
            }
            let result = if commit {
                client.commit_transaction(STEP)
            } else {
                client.abort_transaction(STEP)
            };
            let Err(err) = result else {
                return Ok(commit);
            };
            match outcome(client, err) {
                Outcome::Unknown(_) => continue,
                Outcome::Abort(_) if commit => commit = false,
                Outcome::Abort(error) | Outcome::Fatal(error) => {
                    self.stop_with(error.clone());
                    return Err(error);
                }
            }
        }
    }
}

/// Sends an exactly-once batch's offset to the open transaction, with the group's metadata.
fn send_offsets(
    client: &Client,
    batch: &Batch,
    metadata: &rdkafka::consumer::ConsumerGroupMetadata,
    timeout: Duration,
) -> Result<()> {
    let mut offsets = rdkafka::TopicPartitionList::new();
    offsets
        .add_partition_offset(&batch.tp.0, batch.tp.1, rdkafka::Offset::Offset(batch.next))
        .map_err(Error::from)?;
    client
        .send_offsets_to_transaction(&offsets, metadata, timeout)
        .map_err(Error::from)
}

/// The transaction thread: initialises, then serves one caller at a time until the producer
/// closes.
fn run(shared: Arc<Shared>, txn: Arc<Txn>, queue: Receiver<Command>) {
    let Ok(client) = shared.client() else {
        return txn.stop_with(closed());
    };
    // init_transactions, a step at a time, so that a close is seen while the cluster is away.
    loop {
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
        if txn.closing.load(Ordering::SeqCst) {
            break;
        }
    }
    loop {
        txn.start_next(&client);
        let command = match txn.until_expiry() {
            Some(left) => queue.recv_timeout(left),
            None => queue.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match command {
            Err(RecvTimeoutError::Timeout) => txn.expire(&client),
            Ok(Command::Kick) => {}
            Ok(Command::Finish {
                caller,
                commit,
                timeout,
                batch,
            }) => txn.finish(&client, caller, commit, timeout, batch),
            Ok(Command::Abandon { id }) => {
                // A sharing member died: the shared transaction aborts once the others came.
                let ended = {
                    let mut state = txn.write();
                    match state.open.as_mut() {
                        Some(open) if open.caller.share => match open.member(id) {
                            Some(caller) => {
                                let died = Error::new(
                                    "aborted",
                                    "the worker of a batch in the same transaction died, so \
                                     it was aborted",
                                );
                                if open.arrive(caller, None, Some(died)) {
                                    state.open.take()
                                } else {
                                    None
                                }
                            }
                            None => None,
                        },
                        _ => None,
                    }
                };
                if let Some(open) = ended {
                    txn.end_shared(&client, open, CLEANUP);
                } else if txn.take_open(id).is_some() {
                    txn.abort(&client);
                }
            }
            Ok(Command::Stop { done }) => {
                // The open transaction's owner hears `closed` when it comes to finish it.
                let open = txn.read().open.as_ref().map(|o| o.caller.id);
                if open.and_then(|id| txn.take_open(id)).is_some() {
                    txn.abort(&client);
                }
                txn.stop_with(closed());
                while let Ok(command) = queue.try_recv() {
                    if let Command::Finish { caller, .. } = command {
                        let _state = txn.write();
                        reply(&caller, Err(closed()));
                    }
                }
                let _ = done.send(());
                return;
            }
            Err(RecvTimeoutError::Disconnected) => return txn.stop_with(closed()),
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
    share: bool,
) -> NifResult<Term<'a>> {
    let pid = env.pid();
    let txn = txn_of(&producer)?.clone();
    let id = txn.next_id.fetch_add(1, Ordering::Relaxed);
    let caller = Caller {
        id,
        pid,
        tag,
        share,
    };
    {
        let mut state = txn.write();
        if let Phase::Stopped(error) = &state.phase {
            return Err(error.clone().into());
        }
        // A sharing caller joins the open shared transaction at once (answered now).
        let ready = matches!(state.phase, Phase::Ready);
        match state.open.as_mut() {
            Some(open) if ready && open.open_to(&caller) => {
                open.joined.push(caller);
                reply(&caller, Ok(open.caller.id));
            }
            _ => state.waiting.push_back(caller),
        }
    }
    let call = ResourceArc::new(TxnCall {
        producer: producer.clone(),
        caller,
    });
    // A caller that is already dead cannot be: its place in the queue goes.
    if env.monitor(&call, &pid).is_none() {
        txn.write().waiting.retain(|c| c.id != id);
        return Err(Error::new("noproc", "the calling process is not alive").into());
    }
    if !txn.command(Command::Kick) {
        txn.write().waiting.retain(|c| c.id != id);
        return Err(closed().into());
    }
    Ok((atoms::ok(), call).encode(env))
}

/// The caller stopped waiting for its transaction to open: `:cancelled` if it had not opened
/// (nothing more arrives), `:open` if it had (its `{:ok, id}` is in the caller's mailbox: the
/// caller aborts it), `:gone` if it was refused or ended (its answer is in the mailbox).
#[rustler::nif]
fn transaction_cancel(call: ResourceArc<TxnCall>) -> NifResult<rustler::Atom> {
    let txn = txn_of(&call.producer)?;
    let id = call.caller.id;
    let mut state = txn.write();
    let before = state.waiting.len();
    state.waiting.retain(|c| c.id != id);
    if state.waiting.len() < before {
        return Ok(atoms::cancelled());
    }
    if let Some((caller, gave_up)) = state.beginning.as_mut() {
        if caller.id == id {
            *gave_up = true;
            return Ok(atoms::cancelled());
        }
    }
    if state.open.as_ref().is_some_and(|o| o.member(id).is_some()) {
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
    finish_on_thread(&call, commit, timeout_ms, None)
}

/// Hands the caller's finish to the transaction thread (see `transaction_finish/3`).
fn finish_on_thread(
    call: &TxnCall,
    commit: bool,
    timeout_ms: u64,
    batch: Option<Batch>,
) -> NifResult<rustler::Atom> {
    let txn = txn_of(&call.producer)?;
    if let Some(error) = txn.stopped() {
        return Err(error.into());
    }
    let sent = txn.command(Command::Finish {
        caller: call.caller,
        commit,
        timeout: Duration::from_millis(timeout_ms.max(1)),
        batch,
    });
    if !sent {
        return Err(closed().into());
    }
    Ok(atoms::ok())
}

/// Commits (`commit: true`; or aborts, counted as the batch's) the caller's open transaction
/// together with an exactly-once consumer's batch:
/// `topic`/`partition`'s offset `next` goes to the transaction with the group's metadata,
/// unless the partition is no longer held at `generation` or an earlier transaction
/// committed offset `first` (then the transaction aborts and the answer says why). On
/// success the batch is acked and its commit confirmed before the answer is sent. Answers as
/// `transaction_finish/3` does.
#[rustler::nif]
#[allow(clippy::too_many_arguments)]
fn transaction_commit_batch(
    call: ResourceArc<TxnCall>,
    commit: bool,
    timeout_ms: u64,
    consumer: ResourceArc<crate::consumer::ConsumerResource>,
    topic: String,
    partition: i32,
    generation: i32,
    first: i64,
    next: i64,
) -> NifResult<rustler::Atom> {
    let batch = Batch {
        consumer: consumer.shared().clone(),
        tp: (topic, partition),
        generation,
        first,
        next,
    };
    finish_on_thread(&call, commit, timeout_ms, Some(batch))
}
