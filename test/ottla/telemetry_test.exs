defmodule Ottla.TelemetryTest do
  # Not async: the listener list is VM-wide.
  use ExUnit.Case, async: false

  import ExUnit.CaptureLog
  import Ottla.TestSupport

  @moduletag timeout: 180_000

  setup do
    :persistent_term.put(:ottla_telemetry_listeners, [self()])
    on_exit(fn -> :persistent_term.put(:ottla_telemetry_listeners, []) end)
  end

  # Every event received so far, as {event, measurements, metadata}.
  defp events(acc \\ []) do
    receive do
      {:telemetry, event, measurements, metadata} ->
        events([{event, measurements, metadata} | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end

  defp find(events, name), do: Enum.filter(events, fn {event, _, _} -> event == name end)

  defp assert_event(events, name, measurements, metadata) do
    found = find(events, name)

    assert found != [],
           "no #{inspect(name)} event among #{inspect(events |> Enum.map(&elem(&1, 0)) |> Enum.uniq())}"

    for {_, m, md} <- found do
      for key <- measurements,
          do:
            assert(
              Map.has_key?(m, key),
              "#{inspect(name)} lacks measurement #{key}: #{inspect(m)}"
            )

      for key <- metadata,
          do:
            assert(
              Map.has_key?(md, key),
              "#{inspect(name)} lacks metadata #{key}: #{inspect(md)}"
            )
    end

    found
  end

  test "every documented event fires with its measurements and metadata during produce and group consume with a rebalance" do
    assert Ottla.Telemetry.enabled?()
    topic = create_topic!(partitions: 2)
    group = group_name()
    me = self()
    {:ok, failures} = Agent.start_link(fn -> 0 end)

    # The first batch fails with {:error, …}, the next failure is a raise; then all is well.
    fun = fn _messages, s ->
      case Agent.get_and_update(failures, &{&1, &1 + 1}) do
        0 -> {:error, :first_try, s}
        1 -> raise "crash once"
        _ -> {:ack, s}
      end
    end

    {a, _log} =
      with_log(fn ->
        a =
          start_group!(topic, group,
            id: :a,
            max_batch: 5,
            max_backlog: 10,
            retry_backoff: 10,
            assignment_strategy: :range,
            handler_init_args: %{pid: me, fun: fun},
            config: ["statistics.interval.ms": 200]
          )

        assert :ok = Ottla.produce(endpoints(), topic, for(i <- 0..199, do: {"k#{i}", "v"}))
        assert {:error, _, _} = Ottla.produce(endpoints(), unique_topic(), "x", timeout: 2_000)
        # An unreachable broker: librdkafka reports client errors.
        assert {:error, _, _} = Ottla.produce([{"127.0.0.1", 1}], "t", "x", timeout: 1_000)

        wait_until(
          fn ->
            committed(group, topic) |> Map.values() |> Enum.map(&(&1 || 0)) |> Enum.sum() == 200
          end,
          60_000,
          "commits of all 200 messages"
        )

        Ottla.Group.Acknowledger.ack(a, topic, 0, -5, 1)

        start_group!(topic, group, id: :b, assignment_strategy: :range)

        wait_until(
          fn ->
            match?({:ok, %{last_revoke_duration: ms}} when is_integer(ms), Ottla.stats(a))
          end,
          30_000,
          "a rebalance"
        )

        a
      end)

    events = events()

    [{_, _, ok_stop} | _] =
      assert_event(events, [:ottla, :produce, :stop], [:duration, :count, :bytes, :failed], [
        :topic,
        :target,
        :result
      ])

    assert_event(events, [:ottla, :produce, :start], [:system_time, :count], [:topic, :target])

    results =
      events |> find([:ottla, :produce, :stop]) |> Enum.map(fn {_, _, md} -> md.result end)

    assert :ok in results and :error in results
    assert ok_stop.topic == topic

    batch_md = [:connection, :topic, :partition, :generation_id, :attempt, :lag]
    assert_event(events, [:ottla, :consumer, :batch, :start], [:system_time, :count], batch_md)

    stops =
      assert_event(events, [:ottla, :consumer, :batch, :stop], [:duration, :count], [
        :result | batch_md
      ])

    assert Enum.any?(stops, fn {_, _, md} -> md.result == :error end), "an {:error, …} batch"
    assert Enum.any?(stops, fn {_, _, md} -> md.attempt > 1 end), "a retried batch"

    assert_event(events, [:ottla, :consumer, :batch, :exception], [:duration, :count], [
      :kind,
      :reason | batch_md
    ])

    acks =
      assert_event(events, [:ottla, :consumer, :ack], [:offset], [
        :connection,
        :topic,
        :partition,
        :generation_id,
        :result
      ])

    assert Enum.any?(acks, fn {_, _, md} -> md.result == :advanced end)
    assert Enum.any?(acks, fn {_, _, md} -> md.result == :stale end)

    commits =
      assert_event(events, [:ottla, :consumer, :commit], [:count], [
        :connection,
        :offsets,
        :result
      ])

    assert Enum.any?(commits, fn {_, _, md} -> md.result == :ok end)

    assert_event(events, [:ottla, :consumer, :assigned], [:count], [
      :connection,
      :partitions,
      :generation_id
    ])

    assert_event(events, [:ottla, :consumer, :revoked], [:count, :duration], [
      :connection,
      :partitions
    ])

    assert_event(events, [:ottla, :consumer, :paused], [:count], [:connection, :topic, :partition])

    assert_event(events, [:ottla, :consumer, :resumed], [:count], [
      :connection,
      :topic,
      :partition
    ])

    assert_event(events, [:ottla, :error], [:count], [:facility, :message])

    [{_, _, stats} | _] =
      assert_event(events, [:ottla, :statistics], [:rx_bytes, :tx_bytes, :replyq, :msg_cnt], [
        :client,
        :name,
        :brokers,
        :partitions
      ])

    assert stats.client in [:consumer, :producer]
    assert [%{name: _, rtt_avg_us: _, rtt_p99_us: _} | _] = stats.brokers
    {:ok, %{librdkafka: summary}} = Ottla.stats(a)
    assert %{rx_bytes: _, brokers: [_ | _]} = summary
  end
end
