defmodule Ottla.Native do
  @moduledoc false
  # NIF stubs. Every function is implemented in native/ottla_nif; see its modules for docs.
  @on_load :load_nif

  def load_nif do
    path = :filename.join(:code.priv_dir(:ottla), ~c"native/libottla_nif")
    :erlang.load_nif(path, 0)
  end

  def log_set_process(_pid), do: :erlang.nif_error(:nif_not_loaded)
  def nif_timing, do: :erlang.nif_error(:nif_not_loaded)

  def producer_new(_bootstrap, _props), do: :erlang.nif_error(:nif_not_loaded)

  def producer_partition_count(_pid, _tag, _producer, _topic, _timeout),
    do: :erlang.nif_error(:nif_not_loaded)

  def producer_send(_producer, _pid, _tag, _topic, _messages, _partition, _txn, _timeout),
    do: :erlang.nif_error(:nif_not_loaded)

  def producer_send_dirty(_producer, _pid, _tag, _topic, _messages, _partition, _txn, _timeout),
    do: :erlang.nif_error(:nif_not_loaded)

  def producer_abandon(_batch), do: :erlang.nif_error(:nif_not_loaded)
  def producer_flush(_pid, _tag, _producer, _timeout), do: :erlang.nif_error(:nif_not_loaded)
  def producer_close(_producer, _timeout), do: :erlang.nif_error(:nif_not_loaded)

  def transaction_begin(_producer, _tag, _share), do: :erlang.nif_error(:nif_not_loaded)
  def transaction_cancel(_call), do: :erlang.nif_error(:nif_not_loaded)
  def transaction_finish(_call, _commit, _timeout), do: :erlang.nif_error(:nif_not_loaded)

  def transaction_commit_batch(
        _call,
        _commit,
        _timeout,
        _consumer,
        _topic,
        _partition,
        _gen,
        _first,
        _next
      ),
      do: :erlang.nif_error(:nif_not_loaded)

  # Clients that admin, fetch and metadata calls reuse (see native/ottla_nif/src/clients.rs).
  def clients_new(_bootstrap, _props), do: :erlang.nif_error(:nif_not_loaded)
  def clients_cached(_bootstrap, _props, _idle_ms), do: :erlang.nif_error(:nif_not_loaded)
  def clients_cached_bootstraps, do: :erlang.nif_error(:nif_not_loaded)
  def clients_close(_clients), do: :erlang.nif_error(:nif_not_loaded)
  def clients_forget(_bootstrap), do: :erlang.nif_error(:nif_not_loaded)
  def clients_created(_clients), do: :erlang.nif_error(:nif_not_loaded)

  # Calls that wait on Kafka answer {:ottla_reply, tag, result} to pid (see Ottla.Reply).
  def admin_create_topic(_pid, _tag, _clients, _topic, _partitions, _replicas, _config, _timeout),
    do: :erlang.nif_error(:nif_not_loaded)

  def admin_create_partitions(_pid, _tag, _clients, _topic, _partitions, _timeout),
    do: :erlang.nif_error(:nif_not_loaded)

  def admin_delete_topic(_pid, _tag, _clients, _topic, _timeout),
    do: :erlang.nif_error(:nif_not_loaded)

  def admin_list_topics(_pid, _tag, _clients, _timeout), do: :erlang.nif_error(:nif_not_loaded)

  def admin_partition_count(_pid, _tag, _clients, _topic, _timeout),
    do: :erlang.nif_error(:nif_not_loaded)

  def admin_partition_leaders(_pid, _tag, _clients, _topic, _timeout),
    do: :erlang.nif_error(:nif_not_loaded)

  def admin_committed_offsets(_pid, _tag, _clients, _group, _topic, _timeout),
    do: :erlang.nif_error(:nif_not_loaded)

  def fetch_messages(_pid, _tag, _clients, _topic, _partition, _offset, _max, _timeout),
    do: :erlang.nif_error(:nif_not_loaded)

  def fetch_cursor_new(_clients), do: :erlang.nif_error(:nif_not_loaded)

  def fetch_cursor_read(_pid, _tag, _cursor, _topic, _partition, _from, _until, _max, _timeout),
    do: :erlang.nif_error(:nif_not_loaded)

  def fetch_cursor_close(_pid, _tag, _cursor), do: :erlang.nif_error(:nif_not_loaded)

  def mock_cluster_start(_brokers), do: :erlang.nif_error(:nif_not_loaded)
  def mock_cluster_stop(_cluster), do: :erlang.nif_error(:nif_not_loaded)
  def mock_cluster_broker_set(_cluster, _broker, _down), do: :erlang.nif_error(:nif_not_loaded)
  def mock_cluster_set_latency(_cluster, _broker, _ms), do: :erlang.nif_error(:nif_not_loaded)

  def mock_cluster_fail_requests(_cluster, _api, _error, _count),
    do: :erlang.nif_error(:nif_not_loaded)

  def mock_cluster_set_leader(_cluster, _topic, _partition, _broker),
    do: :erlang.nif_error(:nif_not_loaded)

  def mock_cluster_set_coordinator(_cluster, _kind, _key, _broker),
    do: :erlang.nif_error(:nif_not_loaded)

  def mock_cluster_delay_requests(_cluster, _broker, _api_key, _count, _rtt_ms),
    do: :erlang.nif_error(:nif_not_loaded)

  def mock_cluster_create_topic(_cluster, _topic, _partitions, _replicas),
    do: :erlang.nif_error(:nif_not_loaded)

  def consumer_new(_bootstrap, _props, _manager, _revoker, _topics, _assignment, _tuning),
    do: :erlang.nif_error(:nif_not_loaded)

  def consumer_start(_consumer, _topic, _partition, _generation, _pid, _from),
    do: :erlang.nif_error(:nif_not_loaded)

  def consumer_next(_consumer, _topic, _partition, _generation, _ack),
    do: :erlang.nif_error(:nif_not_loaded)

  def consumer_result(_consumer, _topic, _partition, _generation, _result),
    do: :erlang.nif_error(:nif_not_loaded)

  def consumer_ack(_consumer, _topic, _partition, _generation, _offset),
    do: :erlang.nif_error(:nif_not_loaded)

  def consumer_worker_down(_consumer, _topic, _partition, _generation),
    do: :erlang.nif_error(:nif_not_loaded)

  def consumer_latest_offset(_consumer, _topic, _partition),
    do: :erlang.nif_error(:nif_not_loaded)

  def consumer_revoke_done(_consumer, _id), do: :erlang.nif_error(:nif_not_loaded)

  def consumer_claim_announce(_consumer, _topic, _partition, _generation),
    do: :erlang.nif_error(:nif_not_loaded)

  def consumer_drain(_consumer, _pid, _tag, _timeout_ms), do: :erlang.nif_error(:nif_not_loaded)
  def backoff_ms(_first_ms, _max_ms, _failures), do: :erlang.nif_error(:nif_not_loaded)
  def consumer_clock_ms(_consumer), do: :erlang.nif_error(:nif_not_loaded)
  def consumer_stats(_consumer), do: :erlang.nif_error(:nif_not_loaded)
  def consumer_close(_consumer, _pid, _tag), do: :erlang.nif_error(:nif_not_loaded)

  # Test-only: the consumer's poll thread panics at its next turn (a forced-panic test shows
  # the consumer restarting with nothing lost). Nothing in the library calls it.
  def consumer_test_panic(_consumer), do: :erlang.nif_error(:nif_not_loaded)
  def producer_test_fatal(_producer), do: :erlang.nif_error(:nif_not_loaded)
end
