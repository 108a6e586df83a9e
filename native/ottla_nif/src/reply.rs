//! Calls that wait on Kafka never wait on a BEAM scheduler, dirty ones included (those are
//! shared with the VM's file I/O). Their NIF starts the work on a Rust thread of its own and
//! returns `:ok` at once; the thread answers `{:ottla_reply, tag, result}` to the caller,
//! which waits with `receive … after` (see `Ottla.Reply`).

use std::time::{Duration, Instant};

use rustler::{Atom, Encoder, Env, LocalPid, OwnedEnv, Term};

use crate::atoms;
use crate::error::{Error, Result};

/// Runs `work` on a new thread and sends its result to `pid`, tagged. A panic in `work` is
/// answered as an `internal` error rather than lost.
pub fn spawn<F>(name: &str, pid: LocalPid, tag: u64, work: F) -> Atom
where
    F: for<'a> FnOnce(Env<'a>) -> Term<'a> + Send + 'static,
{
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let mut env = OwnedEnv::new();
            let _ = env.send_and_clear(&pid, |env| {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(env)))
                    .unwrap_or_else(|_| {
                        let error = Error::new("internal", "the call failed inside the NIF");
                        (atoms::error(), error).encode(env)
                    });
                (atoms::ottla_reply(), tag, result).encode(env)
            });
        });
    match spawned {
        Ok(_) => atoms::ok(),
        Err(_) => atoms::error(),
    }
}

/// The instant `timeout` from now. A timeout too far for `Instant` (only a caller bypassing
/// Elixir's validation, which bounds timeouts to a day, can give one) is cut to a year instead
/// of panicking.
pub fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 86_400)))
        .unwrap_or(now)
}

/// `value` for a success, `{:error, %Ottla.Error{}}` for a failure.
pub fn answer<'a, T: Encoder>(env: Env<'a>, result: Result<T>) -> Term<'a> {
    match result {
        Ok(value) => value.encode(env),
        Err(error) => (atoms::error(), error).encode(env),
    }
}
