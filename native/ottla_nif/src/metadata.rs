//! Cluster metadata lookups shared by the producer, fetch and admin calls.

use std::time::Duration;

use rdkafka::client::{Client, ClientContext};
use rdkafka::error::RDKafkaErrorCode;

use crate::error::{Error, Result};

/// The number of partitions of `topic`, or the error that says why it is not available.
pub fn partition_count<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    timeout: Duration,
) -> Result<i32> {
    let metadata = client.fetch_metadata(Some(topic), timeout)?;
    match metadata.topics().iter().find(|t| t.name() == topic) {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
            Ok(t.partitions().len() as i32)
        }
        Some(t) => {
            let code = t
                .error()
                .map(RDKafkaErrorCode::from)
                .unwrap_or(RDKafkaErrorCode::UnknownTopicOrPartition);
            Err(Error::from_code(
                code,
                format!("topic {topic:?} is not available: {code}"),
            ))
        }
        None => Err(Error::from_code(
            RDKafkaErrorCode::UnknownTopicOrPartition,
            format!("topic {topic:?} does not exist"),
        )),
    }
}
