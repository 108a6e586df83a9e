defmodule Ottla.OutageTest do
  # The single broker stops for 30 s while a group consumes, and starts again with its data
  # (scripts/kafka stop-broker / start-broker). Sync: it stops the broker every other test
  # module uses, so it runs alone, and on_exit starts it again whatever happens.
  use ExUnit.Case, async: false

  import ExUnit.CaptureLog
  import Ottla.TestSupport

  @moduletag :outage
  @moduletag timeout: 300_000

  @outage_ms 30_000
  # The consumer must resume within this many ms of the broker answering again.
  @resume_bound_ms 10_000

  defp kafka!(args) do
    {out, status} = System.cmd(Path.expand("scripts/kafka"), args, stderr_to_stdout: true)
    assert status == 0, "scripts/kafka #{Enum.join(args, " ")} failed: #{out}"
    out
  end

  setup do
    on_exit(fn ->
      # Whatever happened, the broker runs and answers when this module ends.
      {_, _} = System.cmd(Path.expand("scripts/kafka"), ["start-broker"], stderr_to_stdout: true)

      wait_until(
        fn -> match?({:ok, _}, Ottla.list_topics(endpoints(), timeout: 5_000)) end,
        120_000,
        "the single broker to answer after the outage test"
      )
    end)
  end

  # Reports each handled batch as {:handled, partition, offsets, ms}; acks it.
  defp reporting_handler(me) do
    fn messages, s ->
      send(
        me,
        {:handled, Ottla.TestHandler.partition(), Enum.map(messages, & &1.value),
         System.monotonic_time(:millisecond)}
      )

      {:ack, s}
    end
  end

  defp committed_total(group, topic),
    do: committed(group, topic) |> Map.values() |> Enum.map(&(&1 || 0)) |> Enum.sum()

  defp produce_values!(target, topic, values) do
    assert :ok == Ottla.produce(target, topic, Enum.map(values, &{&1, &1}), timeout: 20_000)
  end

  # Receives {:handled, ...} until every value in `values` was seen; returns the time the
  # first of them arrived.
  defp await_values(values, timeout, first \\ nil) do
    if MapSet.size(values) == 0 do
      first
    else
      receive do
        {:handled, _p, seen, at} ->
          left = MapSet.difference(values, MapSet.new(seen))
          first = if first == nil and MapSet.size(left) < MapSet.size(values), do: at, else: first
          await_values(left, timeout, first)
      after
        timeout ->
          flunk(
            "#{MapSet.size(values)} values never handled, e.g. #{inspect(Enum.take(values, 3))}"
          )
      end
    end
  end

  test "the broker stopped 30 s: produce fails in time naming each message; the consumer resumes by itself within 10 s and loses nothing" do
    topic = create_topic!(partitions: 4)
    group = group_name()
    me = self()
    conn = conn_name()
    before = for i <- 1..2_000, do: "before-#{i}"
    produce_values!(endpoints(), topic, before)

    {result, log} =
      with_log(fn ->
        start_group!(topic, group,
          connection: conn,
          instance_id: "outage-#{System.unique_integer([:positive])}",
          handler_init_args: %{pid: me, fun: reporting_handler(me)}
        )

        await_values(MapSet.new(before), 60_000)

        wait_until(
          fn -> committed_total(group, topic) == 2_000 end,
          30_000,
          "commits of the first 2,000"
        )

        stopped_at = System.monotonic_time(:millisecond)
        kafka!(["stop-broker"])

        # A produce during the outage returns within its timeout, naming every message.
        during = for i <- 1..10, do: {"during-#{i}", "during-#{i}"}
        t0 = System.monotonic_time(:millisecond)
        produced = Ottla.produce(endpoints(), topic, during, timeout: 3_000)
        produce_ms = System.monotonic_time(:millisecond) - t0
        assert {:error, %Ottla.Error{}, failed} = produced
        assert Enum.map(failed, &elem(&1, 0)) == during
        assert Enum.all?(failed, fn {_, e} -> match?(%Ottla.Error{}, e) end)

        assert produce_ms <= 3_000 + 500,
               "a produce with :timeout 3000 took #{produce_ms} ms during the outage"

        Process.sleep(max(@outage_ms - (System.monotonic_time(:millisecond) - stopped_at), 0))
        kafka!(["start-broker"])
        answered_at = System.monotonic_time(:millisecond)

        after_values = for i <- 1..2_000, do: "after-#{i}"
        produce_values!(endpoints(), topic, after_values)
        first_at = await_values(MapSet.new(after_values), 120_000)

        wait_until(
          fn -> committed_total(group, topic) == 4_000 end,
          30_000,
          "commits of all 4,000"
        )

        {:ok, stats} = Ottla.stats(conn)
        %{resumed_ms: first_at - answered_at, produce_ms: produce_ms, stats: stats}
      end)

    IO.puts(
      "outage: broker down #{@outage_ms} ms; consumer resumed #{result.resumed_ms} ms after the " <>
        "broker answered; produce during the outage returned in #{result.produce_ms} ms"
    )

    assert result.resumed_ms <= @resume_bound_ms,
           "the consumer resumed #{result.resumed_ms} ms after the broker answered"

    # The outage shows in the logs (librdkafka's errors naming the broker) and in the stats
    # (every partition held again, nothing left unacked).
    assert log =~ "127.0.0.1:#{endpoints() |> String.split(":") |> List.last()}"
    assert log =~ ~r/Connection refused|brokers are down|Disconnected/

    assert Enum.sort(Enum.map(result.stats.partitions, & &1.partition)) == [0, 1, 2, 3]
    assert Enum.all?(result.stats.partitions, &(&1.lag in [0, nil]))
  end
end
