//! librdkafka's in-process mock cluster, for the quick start and for users' own tests.
//!
//! `MockCluster` is neither `Send` nor `Sync`, and destroying it blocks, so it lives on a
//! thread of its own; the resource holds the channel that sends that thread commands.
//! The mock has no CreateTopics handler, so topic creation is a command to that thread.

use std::sync::mpsc::{channel, Sender};
use std::sync::Mutex;

use rdkafka::mocking::MockCluster;
use rustler::{Atom, Encoder, Env, NifResult, ResourceArc, Term};

use crate::atoms;
use crate::error::{Error, Result};

enum Command {
    CreateTopic {
        topic: String,
        partitions: i32,
        replicas: i32,
        reply: Sender<Result<()>>,
    },
}

pub struct MockClusterResource {
    /// `None` once stopped; dropping the sender ends the cluster thread.
    commands: Mutex<Option<Sender<Command>>>,
}

#[rustler::resource_impl]
impl rustler::Resource for MockClusterResource {}

impl MockClusterResource {
    fn stop(&self) {
        if let Ok(mut commands) = self.commands.lock() {
            commands.take();
        }
    }

    fn send(&self, command: Command) -> Result<()> {
        let guard = self
            .commands
            .lock()
            .map_err(|_| Error::new("closed", "the mock cluster is stopped"))?;
        match guard.as_ref() {
            Some(tx) => tx
                .send(command)
                .map_err(|_| Error::new("closed", "the mock cluster is stopped")),
            None => Err(Error::new("closed", "the mock cluster is stopped")),
        }
    }
}

fn run(
    cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    commands: std::sync::mpsc::Receiver<Command>,
) {
    // Runs until the resource stops it or is garbage-collected (the sender is dropped).
    for command in commands {
        match command {
            Command::CreateTopic {
                topic,
                partitions,
                replicas,
                reply,
            } => {
                let result = cluster
                    .create_topic(&topic, partitions, replicas)
                    .map_err(Error::from);
                let _ = reply.send(result);
            }
        }
    }
    drop(cluster);
}

/// Starts a mock cluster with `brokers` brokers; `{:ok, resource, "host:port,..."}`.
#[rustler::nif(schedule = "DirtyIo")]
fn mock_cluster_start(env: Env<'_>, brokers: i32) -> NifResult<Term<'_>> {
    let (ready_tx, ready_rx) = channel::<Result<String>>();
    let (tx, rx) = channel::<Command>();
    std::thread::Builder::new()
        .name("ottla-mock-cluster".into())
        .spawn(move || match MockCluster::new(brokers) {
            Ok(cluster) => {
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                run(cluster, rx);
            }
            Err(err) => {
                let _ = ready_tx.send(Err(Error::from(err)));
            }
        })
        .map_err(|e| Error::new("thread_spawn", e.to_string()))?;
    let bootstrap = ready_rx
        .recv()
        .map_err(|_| Error::new("mock_cluster", "the mock cluster thread ended early"))??;
    let resource = ResourceArc::new(MockClusterResource {
        commands: Mutex::new(Some(tx)),
    });
    Ok((atoms::ok(), resource, bootstrap).encode(env))
}

#[rustler::nif(schedule = "DirtyIo")]
fn mock_cluster_create_topic(
    resource: ResourceArc<MockClusterResource>,
    topic: String,
    partitions: i32,
    replicas: i32,
) -> NifResult<Atom> {
    let (reply, answer) = channel();
    resource.send(Command::CreateTopic {
        topic,
        partitions,
        replicas,
        reply,
    })?;
    answer
        .recv()
        .map_err(|_| Error::new("closed", "the mock cluster is stopped"))??;
    Ok(atoms::ok())
}

#[rustler::nif]
fn mock_cluster_stop(resource: ResourceArc<MockClusterResource>) -> Atom {
    resource.stop();
    atoms::ok()
}
