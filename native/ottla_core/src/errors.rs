//! Naming and classifying Kafka error codes for Elixir.

/// `UnknownTopicOrPartition` → `unknown_topic_or_partition`.
pub fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 8);
    for (i, ch) in name.chars().enumerate() {
        if ch.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(ch.to_ascii_lowercase());
        } else {
            out.push(ch);
        }
    }
    out
}

/// Errors that a caller may reasonably retry: transient broker, network and leadership
/// states, named as `snake_case` gives them.
pub fn is_retriable(code: &str) -> bool {
    matches!(
        code,
        "broker_transport_failure"
            | "all_brokers_down"
            | "operation_timed_out"
            | "message_timed_out"
            | "timed_out"
            | "queue_full"
            | "request_timed_out"
            | "network_exception"
            | "leader_not_available"
            | "not_leader_for_partition"
            | "not_enough_replicas"
            | "not_enough_replicas_after_append"
            | "coordinator_load_in_progress"
            | "coordinator_not_available"
            | "not_coordinator"
            | "rebalance_in_progress"
            | "unknown_topic_or_partition"
            | "kafka_storage_error"
            | "fenced_leader_epoch"
            | "unknown_leader_epoch"
            | "transport"
            | "resolve"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snake_case_splits_on_capitals() {
        assert_eq!(
            snake_case("UnknownTopicOrPartition"),
            "unknown_topic_or_partition"
        );
        assert_eq!(snake_case("MessageTimedOut"), "message_timed_out");
        assert_eq!(snake_case("Fail"), "fail");
    }

    #[test]
    fn transient_states_are_retriable_and_permanent_ones_are_not() {
        assert!(is_retriable("leader_not_available"));
        assert!(is_retriable("message_timed_out"));
        assert!(!is_retriable("topic_already_exists"));
        assert!(!is_retriable("invalid_config"));
    }
}
