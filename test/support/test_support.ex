defmodule Ottla.TestSupport do
  @moduledoc false
  # Helpers for tests against the real broker.

  import ExUnit.Assertions

  @doc "The real broker's bootstrap string (`OTTLA_KAFKA_ENDPOINTS`, default 127.0.0.1:9092)."
  def endpoints, do: System.get_env("OTTLA_KAFKA_ENDPOINTS", "127.0.0.1:9092")

  @doc "A topic name no other test uses."
  def unique_topic(prefix \\ "ottla-test"),
    do: "#{prefix}-#{System.unique_integer([:positive])}-#{:rand.uniform(1_000_000)}"

  @doc "Creates a fresh topic on the real broker and returns its name."
  def create_topic!(opts \\ []) do
    topic = unique_topic()
    assert :ok == Ottla.create_topic(endpoints(), topic, opts)
    topic
  end

  @doc "Reads a whole partition of the real broker."
  def fetch_all!(topic, partition) do
    assert {:ok, hw, messages} = Ottla.fetch(endpoints(), topic, partition: partition)
    {hw, messages}
  end

  @doc "Waits until `fun` returns a truthy value (polling every 50 ms); fails after `timeout` ms."
  def wait_until(fun, timeout \\ 30_000, message \\ "condition") do
    deadline = System.monotonic_time(:millisecond) + timeout
    do_wait_until(fun, deadline, message)
  end

  defp do_wait_until(fun, deadline, message) do
    case fun.() do
      falsy when falsy in [nil, false] ->
        if System.monotonic_time(:millisecond) > deadline do
          flunk("timed out waiting for #{message}")
        else
          Process.sleep(50)
          do_wait_until(fun, deadline, message)
        end

      value ->
        value
    end
  end

  @doc "A unique connection name."
  def conn_name, do: :"ottla_conn_#{System.unique_integer([:positive])}"

  @doc "A unique consumer group name."
  def group_name,
    do: "ottla-group-#{System.unique_integer([:positive])}-#{:rand.uniform(1_000_000)}"

  @doc "Starts a group consumer connection under the test supervisor; returns its name."
  def start_group!(topic, group, opts \\ []) do
    name = Keyword.get(opts, :connection, conn_name())
    {extra, gc} = Keyword.split(opts, [:connection, :id])

    gc =
      Keyword.merge(
        [
          group: group,
          topics: [topic],
          handler: Ottla.TestHandler,
          handler_init_args: %{pid: self()},
          begin_offset: :earliest,
          config: ["session.timeout.ms": 10_000, "heartbeat.interval.ms": 1_000]
        ],
        gc
      )

    ExUnit.Callbacks.start_supervised!(
      {Ottla.Supervisor, connection: name, endpoints: endpoints(), group_consumer: gc},
      id: Keyword.get(extra, :id, name)
    )

    name
  end

  @doc "Waits until the consumer of connection `conn` has completed a revocation; its stats."
  def wait_for_revoke!(conn) do
    wait_until(
      fn ->
        case Ottla.stats(conn) do
          {:ok, %{last_revoke_duration: ms} = stats} when is_integer(ms) -> stats
          _ -> nil
        end
      end,
      30_000,
      "a revocation on #{inspect(conn)}"
    )
  end

  @doc "The committed offsets of a group, as a map partition => offset."
  def committed(group, topic) do
    {:ok, list} = Ottla.committed_offsets(endpoints(), group, topic)
    Map.new(list)
  end

  @doc """
  Collects {:batch, ...} messages until `done?.(acc)` holds, failing after `timeout` ms.
  `acc` is a map {partition => [offset]} of everything delivered, in delivery order.
  """
  def collect_batches(done?, timeout \\ 60_000, acc \\ %{}) do
    if done?.(acc) do
      acc
    else
      receive do
        {:batch, _pid, _topic, partition, messages} ->
          offsets = Enum.map(messages, & &1.offset)
          collect_batches(done?, timeout, Map.update(acc, partition, offsets, &(&1 ++ offsets)))
      after
        timeout -> flunk("no batch within #{timeout} ms; delivered so far: #{summary(acc)}")
      end
    end
  end

  @doc "Partition => count, for failure messages."
  def summary(acc), do: inspect(Map.new(acc, fn {p, l} -> {p, length(l)} end))

  @doc """
  The partition the Java client's default partitioner picks for a key:
  `toPositive(murmur2(key)) % count` (Ottla's own implementation; the tests check that
  librdkafka places keys exactly there).
  """
  def java_partition(key, count), do: Ottla.Partitioner.Default.partition(count, key)
end
