defmodule Ottla.GroupConsumerTest do
  use ExUnit.Case, async: true

  import Ottla.TestSupport

  alias Ottla.Group.Acknowledger

  @moduletag timeout: 180_000

  defp produce_spread!(topic, partitions, per_partition) do
    for p <- 0..(partitions - 1) do
      msgs = for i <- 0..(per_partition - 1), do: {"k#{i}", "p#{p}-#{i}"}
      assert :ok = Ottla.produce(endpoints(), topic, msgs, partition: p)
    end
  end

  defp all_offsets(partitions, per_partition),
    do: Map.new(0..(partitions - 1), &{&1, Enum.to_list(0..(per_partition - 1))})

  describe "delivery" do
    test "100,000 messages over 8 partitions reach handlers in offset order per partition and are committed" do
      topic = create_topic!(partitions: 8)
      produce_spread!(topic, 8, 12_500)
      group = group_name()
      start_group!(topic, group, max_batch: 500)

      delivered =
        collect_batches(
          fn acc -> Enum.sum(Enum.map(acc, fn {_, l} -> length(l) end)) >= 100_000 end,
          60_000
        )

      for p <- 0..7 do
        assert delivered[p] == Enum.to_list(0..12_499),
               "partition #{p}: #{length(delivered[p] || [])} delivered, out of order or with gaps"
      end

      wait_until(
        fn -> committed(group, topic) == Map.new(0..7, &{&1, 12_500}) end,
        15_000,
        "commits"
      )
    end

    test "messages carry topic, partition, key, value, headers and the generation" do
      topic = create_topic!()

      :ok =
        Ottla.produce(endpoints(), topic, %{
          key: "k",
          value: "v",
          headers: [{"h", "1"}],
          timestamp: 1_000
        })

      conn = start_group!(topic, group_name())
      assert_receive {:batch, _, ^topic, 0, [msg]}, 30_000

      assert %Ottla.Message{topic: ^topic, partition: 0, offset: 0, key: "k", value: "v"} = msg
      assert msg.headers == [{"h", "1"}]
      assert msg.timestamp == 1_000
      assert is_integer(msg.generation_id)
      {:ok, stats} = Ottla.stats(conn)
      assert [%{generation_id: gen}] = stats.partitions
      assert gen == msg.generation_id
      assert is_integer(stats.last_rebalance)

      # Once acked and committed, the stats show the high watermark and no lag.
      p0 =
        wait_until(
          fn ->
            {:ok, %{partitions: [p0]}} = Ottla.stats(conn)
            p0.committed == 1 and p0.high_watermark == 1 and p0
          end,
          15_000,
          "stats to show offset 0 committed"
        )

      assert %{last_delivered: 0, last_acked: 0, lag: 0, backlog: 0, paused?: false} = p0
    end

    test "a stateless handle_messages/1 handler works as in Elsa" do
      Application.put_env(:ottla, :test_pid, self())
      topic = create_topic!()
      :ok = Ottla.produce(endpoints(), topic, ["a", "b"])
      group = group_name()
      start_group!(topic, group, handler: Ottla.StatelessHandler)
      assert_receive {:stateless, 0, gen, messages}, 30_000
      assert is_integer(gen)
      assert Enum.map(messages, & &1.value) == ["a", "b"]
      wait_until(fn -> committed(group, topic) == %{0 => 2} end, 15_000, "commit of 2")
    end

    test "a handler that uses linked Tasks keeps its worker" do
      topic = create_topic!()
      :ok = Ottla.produce(endpoints(), topic, for(i <- 0..49, do: "m#{i}"))
      me = self()

      fun = fn messages, s ->
        # Task.async links to the worker; the task's normal exit must not stop it.
        Task.async(fn -> length(messages) end) |> Task.await()
        {:ack, s}
      end

      start_group!(topic, group_name(), max_batch: 5, handler_init_args: %{pid: me, fun: fun})
      delivered = collect_batches(fn acc -> length(Map.get(acc, 0, [])) >= 50 end)
      assert delivered[0] == Enum.to_list(0..49)
      refute_receive {:batch, _, _, _, _}, 500
    end

    test "assignment_received_handler sees each partition with its generation" do
      topic = create_topic!(partitions: 2)
      me = self()

      start_group!(topic, group_name(),
        assignment_received_handler: fn group, t, p, gen ->
          send(me, {:assigned, group, t, p, gen})
          :ok
        end
      )

      assert_receive {:assigned, _, ^topic, p1, gen}, 30_000
      assert_receive {:assigned, _, ^topic, p2, ^gen}, 30_000
      assert Enum.sort([p1, p2]) == [0, 1]
      assert is_integer(gen)
    end
  end

  describe "acks and generations" do
    test "a stale-generation ack is dropped and not committed; get_latest_offset is acked + 1" do
      topic = create_topic!()
      :ok = Ottla.produce(endpoints(), topic, for(i <- 0..9, do: "m#{i}"))
      group = group_name()
      me = self()

      conn =
        start_group!(topic, group,
          handler_init_args: %{pid: me, fun: fn _, s -> {:continue, s} end}
        )

      assert_receive {:batch, _, _, 0, [first | _] = batch}, 30_000
      gen = first.generation_id
      rest = collect_batches(fn acc -> length(batch) + length(Map.get(acc, 0, [])) >= 10 end)
      assert Enum.map(batch, & &1.offset) ++ Map.get(rest, 0, []) == Enum.to_list(0..9)

      assert Acknowledger.get_latest_offset(conn, topic, 0) == nil

      assert :ok = Acknowledger.ack(conn, topic, 0, gen + 1, 9)
      assert :ok = Acknowledger.ack(conn, topic, 0, gen - 1, 9)
      assert Acknowledger.get_latest_offset(conn, topic, 0) == nil
      {:ok, stats} = Ottla.stats(conn)
      assert stats.stale_acks == 2

      assert :ok = Acknowledger.ack(conn, topic, 0, gen, 4)
      assert Acknowledger.get_latest_offset(conn, topic, 0) == 5
      assert :ok = Acknowledger.ack(conn, topic, 0, gen, 2)

      assert Acknowledger.get_latest_offset(conn, topic, 0) == 5,
             "a lower ack moved the offset back"

      wait_until(fn -> committed(group, topic) == %{0 => 5} end, 15_000, "commit of offset 5")

      # An ack beyond what was delivered would commit unprocessed messages: dropped.
      assert :ok = Acknowledger.ack(conn, topic, 0, gen, 10)
      {:ok, stats} = Ottla.stats(conn)
      assert stats.undelivered_acks == 1
      assert Acknowledger.get_latest_offset(conn, topic, 0) == 5

      # An ack for a partition this member does not hold is dropped too.
      assert :ok = Acknowledger.ack(conn, topic, 7, gen, 1)
      {:ok, stats} = Ottla.stats(conn)
      assert stats.unheld_acks == 1
      assert :ok = Acknowledger.update_generation_id(conn, gen)
      assert committed(group, topic) == %{0 => 5}
    end

    test "{:continue, state} then an ack from another process commits" do
      topic = create_topic!(partitions: 2)
      produce_spread!(topic, 2, 20)
      group = group_name()
      me = self()

      conn =
        start_group!(topic, group,
          handler_init_args: %{pid: me, fun: fn _, s -> {:continue, s} end}
        )

      delivered =
        collect_batches(fn acc ->
          map_size(acc) == 2 and Enum.all?(acc, &(length(elem(&1, 1)) == 20))
        end)

      assert delivered == all_offsets(2, 20)
      assert committed(group, topic) == %{0 => nil, 1 => nil}

      task =
        Task.async(fn ->
          Acknowledger.ack(conn, %{
            topic: topic,
            partition: 0,
            generation_id: gen_of(conn, 0),
            offset: 19
          })

          Acknowledger.ack(conn, topic, 1, gen_of(conn, 1), 9)
        end)

      assert :ok = Task.await(task)

      wait_until(
        fn -> committed(group, topic) == %{0 => 20, 1 => 10} end,
        15_000,
        "commits 20 and 10"
      )

      # The consumer learns its commit succeeded from the commit's result, which may reach it
      # a moment after the group coordinator already answers with the new offsets.
      wait_until(
        fn ->
          {:ok, %{partitions: ps}} = Ottla.stats(conn)
          Enum.map(ps, & &1.committed) == [20, 10]
        end,
        5_000,
        "the consumer to see its commits"
      )

      {:ok, %{partitions: [p0, p1]}} = Ottla.stats(conn)
      assert {p0.last_acked, p0.committed} == {19, 20}
      assert {p1.last_acked, p1.committed} == {9, 10}
    end

    test "{:ack, offset, state} acks up to offset and redelivers the rest of the batch" do
      topic = create_topic!()
      :ok = Ottla.produce(endpoints(), topic, for(i <- 0..9, do: "m#{i}"))
      group = group_name()
      me = self()
      {:ok, seen} = Agent.start_link(fn -> 0 end)

      # The first batch of two or more messages is acked only up to its first message.
      fun = fn messages, s ->
        if length(messages) >= 2 and Agent.get_and_update(seen, &{&1, &1 + 1}) == 0 do
          send(me, {:partial_ack, hd(messages).offset})
          {:ack, hd(messages).offset, s}
        else
          {:ack, s}
        end
      end

      start_group!(topic, group, handler_init_args: %{pid: me, fun: fun})
      delivered = collect_batches(fn acc -> Enum.count(Map.get(acc, 0, []), &(&1 == 9)) >= 2 end)
      assert_receive {:partial_ack, acked}, 1_000
      offsets = delivered[0]
      again = offsets -- Enum.to_list(0..9)
      # Redelivery starts right after the acked offset; nothing at or before it comes again.
      assert again != [] and hd(again) == acked + 1,
             "after acking #{acked} of a batch the redelivered offsets were #{inspect(again)} (all: #{inspect(offsets)})"

      assert Enum.sort(Enum.uniq(offsets)) == Enum.to_list(0..9)
      wait_until(fn -> committed(group, topic) == %{0 => 10} end, 15_000, "commit of 10")
    end
  end

  describe "failures" do
    test "killing a worker mid-batch redelivers only unacked messages, other partitions go on" do
      topic = create_topic!(partitions: 2)
      produce_spread!(topic, 2, 50)
      group = group_name()
      me = self()
      {:ok, stuck_once} = Agent.start_link(fn -> false end)

      fun = fn messages, s ->
        offsets = Enum.map(messages, & &1.offset)

        if Ottla.TestHandler.partition() == 0 and 20 in offsets and
             not Agent.get_and_update(stuck_once, &{&1, true}) do
          send(me, {:stuck, self(), offsets})
          Process.sleep(:infinity)
        end

        {:ack, s}
      end

      start_group!(topic, group, max_batch: 10, handler_init_args: %{pid: me, fun: fun})
      assert_receive {:stuck, worker, killed_batch}, 30_000
      Process.exit(worker, :kill)

      delivered =
        collect_batches(fn acc ->
          Enum.count(Map.get(acc, 0, []), &(&1 == 49)) == 1 and length(Map.get(acc, 1, [])) >= 50
        end)

      assert delivered[1] == Enum.to_list(0..49)
      # Every batch before the killed one was acked: only the killed batch comes twice,
      # and delivery resumed at its first offset.
      assert delivered[0] -- Enum.to_list(0..49) == killed_batch,
             "killed batch #{inspect(killed_batch)}, partition 0 saw #{inspect(ranges(delivered[0]))}"

      [resumed | _] = Enum.drop(delivered[0], List.last(killed_batch) + 1)
      assert resumed == hd(killed_batch)
      wait_until(fn -> committed(group, topic) == %{0 => 50, 1 => 50} end, 15_000, "commits")
    end

    test "a handler that raises is retried with backoff from the first unacked message" do
      topic = create_topic!()
      :ok = Ottla.produce(endpoints(), topic, for(i <- 0..4, do: "m#{i}"))
      me = self()
      {:ok, attempts} = Agent.start_link(fn -> 0 end)

      fun = fn _messages, s ->
        if Agent.get_and_update(attempts, &{&1 + 1, &1 + 1}) <= 3, do: raise("boom")
        {:ack, s}
      end

      start_group!(topic, group_name(),
        retry_backoff: 100,
        max_retry_backoff: 1_000,
        handler_init_args: %{pid: me, fun: fun}
      )

      times =
        for _ <- 1..4 do
          assert_receive {:batch, _, _, 0, messages}, 30_000
          assert hd(messages).offset == 0
          System.monotonic_time(:millisecond)
        end

      assert Agent.get(attempts, & &1) == 4

      # After failure n the backoff is 100 ms doubled n - 1 times, with jitter between half of
      # it and all of it: the gaps are at least 50, 100 and 200 ms.
      gaps = times |> Enum.chunk_every(2, 1, :discard) |> Enum.map(fn [a, b] -> b - a end)

      for {gap, n} <- Enum.with_index(gaps, 1) do
        assert gap >= div(100 * Integer.pow(2, n - 1), 2) - 1,
               "retry #{n} came #{gap} ms after the failure (gaps: #{inspect(gaps)})"
      end
    end

    test "restarting a group after a graceful shutdown redelivers nothing" do
      topic = create_topic!(partitions: 3)
      produce_spread!(topic, 3, 30)
      group = group_name()
      conn = start_group!(topic, group, id: :first)

      delivered =
        collect_batches(fn acc -> Enum.sum(Enum.map(acc, fn {_, l} -> length(l) end)) >= 90 end)

      assert delivered == all_offsets(3, 30)
      stop_supervised!(:first)
      assert committed(group, topic) == %{0 => 30, 1 => 30, 2 => 30}

      :ok = Ottla.produce(endpoints(), topic, {"after", "restart"}, partition: 1)
      start_group!(topic, group, connection: conn, id: :second)
      assert_receive {:batch, _, _, 1, [%{offset: 30, value: "restart"}]}, 30_000
      refute_receive {:batch, _, _, _, _}, 2_000
    end
  end

  describe "core correctness" do
    import ExUnit.CaptureLog

    test "a worker that exits with {:shutdown, :closed} is restarted, logged, and gets its batch again" do
      topic = create_topic!()
      :ok = Ottla.produce(endpoints(), topic, for(i <- 0..4, do: "m#{i}"))
      me = self()
      {:ok, calls} = Agent.start_link(fn -> 0 end)

      fun = fn _messages, s ->
        if Agent.get_and_update(calls, &{&1, &1 + 1}) == 0 do
          # A client the handler is linked to closes: its exit reaches the worker.
          spawn_link(fn -> exit({:shutdown, :closed}) end)
          {:no_ack, s}
        else
          {:ack, s}
        end
      end

      log =
        capture_log(fn ->
          start_group!(topic, group_name(), handler_init_args: %{pid: me, fun: fun})
          assert_receive {:batch, first, _, 0, batch}, 30_000
          assert_receive {:batch, second, _, 0, ^batch}, 10_000
          assert first != second, "the same worker process got the batch twice"
        end)

      assert log =~ "worker for #{topic}/0 exited: {:shutdown, :closed}"
    end

    test "an old consumer's ack is stale for the next one, even after a restart of the connection" do
      topic = create_topic!()
      :ok = Ottla.produce(endpoints(), topic, ["a", "b"])
      group = group_name()
      me = self()
      continue = %{pid: me, fun: fn _, s -> {:continue, s} end}
      conn = start_group!(topic, group, id: :old, handler_init_args: continue)
      assert_receive {:batch, _, _, 0, [old | _]}, 30_000
      stop_supervised!(:old)

      start_group!(topic, group, connection: conn, id: :new, handler_init_args: continue)
      assert_receive {:batch, _, _, 0, [new | _]}, 30_000
      assert new.generation_id != old.generation_id

      assert :ok = Acknowledger.ack(conn, old)
      {:ok, stats} = Ottla.stats(conn)
      assert stats.stale_acks == 1
      assert Acknowledger.get_latest_offset(conn, topic, 0) == nil
      assert :ok = Acknowledger.ack(conn, new)
      assert Acknowledger.get_latest_offset(conn, topic, 0) == new.offset + 1
    end

    test "{:ack, offset, state} below the batch acks nothing, warns, and does not loop" do
      topic = create_topic!()
      :ok = Ottla.produce(endpoints(), topic, for(i <- 0..9, do: "m#{i}"))
      group = group_name()
      me = self()

      fun = fn [first | _], s ->
        if first.offset == 0, do: {:ack, -1, s}, else: {:ack, s}
      end

      log =
        capture_log(fn ->
          start_group!(topic, group, max_batch: 5, handler_init_args: %{pid: me, fun: fun})
          delivered = collect_batches(fn acc -> Map.get(acc, 0, []) |> Enum.member?(9) end)
          assert delivered[0] == Enum.to_list(0..9)
          refute_receive {:batch, _, _, _, _}, 1_000
        end)

      assert log =~ "below the batch, so nothing is acked"
      wait_until(fn -> committed(group, topic) == %{0 => 10} end, 15_000, "commit of 10")
    end

    test "a revoke completes within drain_timeout + 1 s while a handler never returns, and that handler is killed" do
      topic = create_topic!(partitions: 2)
      produce_spread!(topic, 2, 5)
      group = group_name()
      me = self()

      stuck = fn _messages, s ->
        send(me, {:stuck, self()})
        Process.sleep(:infinity)
        {:ack, s}
      end

      a =
        start_group!(topic, group,
          id: :a,
          drain_timeout: 2_000,
          assignment_strategy: :range,
          handler_init_args: %{pid: me, fun: stuck}
        )

      assert_receive {:stuck, worker}, 30_000
      ref = Process.monitor(worker)
      start_group!(topic, group, id: :b, assignment_strategy: :range)

      stats = wait_for_revoke!(a)

      assert stats.last_revoke_duration <= 3_000,
             "the revoke took #{stats.last_revoke_duration} ms with a drain_timeout of 2000 ms"

      assert_receive {:DOWN, ^ref, :process, ^worker, :killed}, 1_000
    end
  end

  describe "rebalances" do
    for strategy <- [:cooperative_sticky, :range] do
      test "members join and leave (#{strategy}): every message is processed, none acked twice" do
        rebalance_scenario(unquote(strategy))
      end
    end
  end

  defp rebalance_scenario(strategy) do
    topic = create_topic!(partitions: 6)
    produce_spread!(topic, 6, 1_500)
    group = group_name()
    me = self()
    # Slow enough that rebalances happen mid-stream; fast enough to drain within the timeout.
    fun = fn _messages, s ->
      Process.sleep(100)
      {:ack, s}
    end

    member = fn id ->
      start_group!(topic, group,
        id: id,
        max_batch: 20,
        assignment_strategy: strategy,
        handler_init_args: %{pid: me, fun: fun}
      )
    end

    total = fn acc -> Enum.sum(Enum.map(acc, fn {_, l} -> length(l) end)) end
    a = member.(:a)
    b = member.(:b)
    acc = collect_batches(fn acc -> total.(acc) >= 1_500 end)

    wait_until(
      fn ->
        Enum.all?([a, b], fn m -> match?({:ok, %{partitions: [_ | _]}}, Ottla.stats(m)) end)
      end,
      30_000,
      "both members to hold partitions"
    )

    {:ok, %{partitions: pa}} = Ottla.stats(a)
    {:ok, %{partitions: pb}} = Ottla.stats(b)
    assert length(pa) + length(pb) == 6, "a holds #{length(pa)}, b holds #{length(pb)}"

    c = member.(:c)
    acc = collect_batches(fn acc -> total.(acc) >= 4_500 end, 60_000, acc)

    wait_until(
      fn -> match?({:ok, %{partitions: [_ | _]}}, Ottla.stats(c)) end,
      30_000,
      "c to hold partitions"
    )

    stop_supervised!(:a)

    acc = collect_batches(fn acc -> total.(acc) >= 9_000 end, 90_000, acc)

    for p <- 0..5 do
      offsets = Map.get(acc, p, [])
      missing = Enum.to_list(0..1_499) -- offsets
      dups = offsets -- Enum.to_list(0..1_499)

      assert missing == [] and dups == [],
             "partition #{p}: missing #{inspect(ranges(missing))}, delivered twice although acked " <>
               "#{inspect(ranges(dups))}; delivery order #{inspect(ranges(offsets))}"
    end

    wait_until(
      fn -> committed(group, topic) == Map.new(0..5, &{&1, 1_500}) end,
      30_000,
      "commits"
    )
  end

  describe "static membership (:instance_id)" do
    test "two members under one :instance_id: the older is fenced, stops its workers and holds nothing; the newer gets everything" do
      topic = create_topic!(partitions: 2)
      group = group_name()
      instance = "fenced-#{System.unique_integer([:positive])}"

      log =
        ExUnit.CaptureLog.capture_log(fn ->
          old = start_group!(topic, group, instance_id: instance, id: :old)
          wait_until(fn -> match?({:ok, %{partitions: [_, _]}}, Ottla.stats(old)) end)
          new = start_group!(topic, group, instance_id: instance, id: :new)
          wait_until(fn -> match?({:ok, %{partitions: []}}, Ottla.stats(old)) end)
          wait_until(fn -> match?({:ok, %{partitions: [_, _]}}, Ottla.stats(new)) end)
          produce_spread!(topic, 2, 10)

          delivered =
            collect_batches(&(Enum.sum(Enum.map(Map.values(&1), fn l -> length(l) end)) >= 20))

          assert delivered == all_offsets(2, 10)
          assert {:ok, %{partitions: []}} = Ottla.stats(old)

          workers =
            DynamicSupervisor.which_children(
              {:via, Registry, {Ottla.Registry, {:workers, old, :group}}}
            )

          assert workers == [], "the fenced member still runs workers: #{inspect(workers)}"
        end)

      assert log =~ "failed for good"
      assert log =~ "fenced"
    end
  end

  describe "backpressure" do
    test "blocked handlers on 4 partitions hold no more than the consumer's byte budget allows" do
      topic = create_topic!(partitions: 4)
      value = :binary.copy("v", 10_000)

      for p <- 0..3 do
        msgs = for i <- 1..300, do: {"k#{i}", value}
        :ok = Ottla.produce(endpoints(), topic, msgs, partition: p)
      end

      me = self()
      {:ok, released} = Agent.start_link(fn -> false end)

      # Every handler blocks on its first batch: the backlogs fill up to their shares.
      fun = fn _messages, s ->
        unless Agent.get(released, & &1) do
          send(me, {:blocked, self()})

          receive do
            :release -> :ok
          end
        end

        {:ack, s}
      end

      budget = 8 * 1_048_576

      conn =
        start_group!(topic, group_name(),
          max_buffered_bytes: budget,
          handler_init_args: %{pid: me, fun: fun}
        )

      workers = for _ <- 1..4, do: assert_receive({:blocked, pid}, 30_000) && pid

      stats =
        wait_until(
          fn ->
            {:ok, stats} = Ottla.stats(conn)
            Enum.all?(stats.partitions, & &1.paused?) && stats
          end,
          15_000,
          "every partition to pause at its share of the budget"
        )

      # A share is an eighth of the budget over 4 partitions, for the backlog and as much for
      # the delivered messages kept; each may go one message past it.
      share = div(budget, 8 * 4)
      message = 10_000 + 200

      for p <- stats.partitions do
        assert p.held_bytes <= 2 * share + message,
               "partition #{p.partition} holds #{p.held_bytes} bytes, share #{share}"
      end

      assert stats.max_buffered_bytes == budget
      assert stats.buffered_bytes == Enum.sum(Enum.map(stats.partitions, & &1.held_bytes))
      assert stats.buffered_bytes <= div(budget, 4) + 4 * message
      # Not everything came in: 1.2 MB a partition, far past a share.
      assert Enum.all?(stats.partitions, &(&1.last_delivered < 299))

      Agent.update(released, fn _ -> true end)
      for w <- workers, do: send(w, :release)

      delivered =
        collect_batches(fn acc -> Enum.all?(0..3, &(length(Map.get(acc, &1, [])) >= 300)) end)

      for p <- 0..3, do: assert(Enum.uniq(delivered[p]) == Enum.to_list(0..299))
    end

    test "a sleeping handler pauses its partition at max_backlog while others flow" do
      topic = create_topic!(partitions: 2)
      produce_spread!(topic, 2, 3_000)
      me = self()
      {:ok, released} = Agent.start_link(fn -> false end)

      fun = fn messages, s ->
        if Ottla.TestHandler.partition() == 0 and not Agent.get(released, & &1) do
          send(me, {:blocked, self(), List.last(messages).offset})

          receive do
            :release -> :ok
          end
        end

        {:ack, s}
      end

      conn =
        start_group!(topic, group_name(),
          max_batch: 10,
          max_backlog: 100,
          handler_init_args: %{pid: me, fun: fun}
        )

      assert_receive {:blocked, worker, blocked_at}, 30_000
      memory_before = :erlang.memory(:total)

      first = collect_batches(fn acc -> length(Map.get(acc, 1, [])) == 3_000 end)

      stats =
        wait_until(
          fn ->
            {:ok, %{partitions: ps}} = Ottla.stats(conn)
            p0 = Enum.find(ps, &(&1.partition == 0))
            p0.paused? && p0
          end,
          10_000,
          "partition 0 to pause"
        )

      assert stats.backlog <= 100,
             "backlog of the blocked partition is #{stats.backlog}, bound 100"

      assert stats.backlog >= 50
      # The README's bound: at most 2 × max_backlog messages held per partition.
      assert stats.held <= 200, "partition 0 holds #{stats.held} messages, bound 200"
      assert stats.last_delivered == blocked_at
      {:message_queue_len, queued} = Process.info(worker, :message_queue_len)
      assert queued <= 1, "the blocked worker's mailbox holds #{queued} messages"
      growth = :erlang.memory(:total) - memory_before

      assert growth < 50_000_000,
             "BEAM memory grew by #{growth} bytes while a partition was blocked"

      Agent.update(released, fn _ -> true end)
      send(worker, :release)

      delivered =
        collect_batches(fn acc -> length(Map.get(acc, 0, [])) == 3_000 end, 60_000, first)

      assert delivered[0] == Enum.to_list(0..2_999)

      wait_until(
        fn ->
          {:ok, %{partitions: ps}} = Ottla.stats(conn)
          not Enum.find(ps, &(&1.partition == 0)).paused?
        end,
        5_000,
        "partition 0 to resume"
      )
    end
  end

  describe "options" do
    test "bad group_consumer options raise ArgumentError naming the option" do
      base = [group: "g", topics: ["t"], handler: Ottla.TestHandler]

      for {change, name} <- [
            {[group: ""], ":group"},
            {[topics: []], ":topics"},
            {[topics: [1]], "topic"},
            {[handler: NoSuchModule], ":handler"},
            {[handler: String], ":handler"},
            {[begin_offset: 5], ":begin_offset"},
            {[max_batch: 0], ":max_batch"},
            {[max_backlog: -1], ":max_backlog"},
            {[max_buffered_bytes: 1_000_000], ":max_buffered_bytes"},
            {[max_buffered_bytes: :lots], ":max_buffered_bytes"},
            {[assignment_strategy: :sticky], ":assignment_strategy"},
            {[drain_timeout: :soon], ":drain_timeout"},
            {[assignment_received_handler: fn -> :ok end], ":assignment_received_handler"},
            {[assignments_revoked_handler: fn _ -> :ok end], ":assignments_revoked_handler"},
            {[max_attempts: 0], ":max_attempts"},
            {[on_failure: :drop], ":on_failure"},
            {[on_failure: {:dead_letter, ""}], "topic"},
            {[retry_backoff: -1], ":retry_backoff"},
            {[max_retry_backoff: :long], ":max_retry_backoff"},
            {[offsets: :database], ":offsets"},
            {[offsets: {:elsewhere, fn -> 1 end}], ":offsets"},
            {[wat: 1], "wat"}
          ] do
        opts = [
          connection: conn_name(),
          endpoints: endpoints(),
          group_consumer: Keyword.merge(base, change)
        ]

        error = assert_raise ArgumentError, fn -> Ottla.Supervisor.start_link(opts) end
        assert error.message =~ name, "expected #{inspect(name)} in: #{error.message}"
      end
    end

    test "the Acknowledger and stats on a connection without a consumer" do
      name = conn_name()
      start_supervised!({Ottla.Supervisor, connection: name, endpoints: endpoints()})

      # As Elsa's casts: an ack without a running consumer is dropped, not raised.
      assert :ok = Acknowledger.ack(name, "t", 0, 1, 1)
      assert Acknowledger.get_latest_offset(name, "t", 0) == nil
      assert {:error, %Ottla.Error{code: :no_consumer}} = Ottla.stats(name)

      assert_raise ArgumentError, ~r/generation_id/, fn ->
        Acknowledger.ack(name, "t", 0, :x, 1)
      end

      assert_raise ArgumentError, ~r/:partition/, fn -> Acknowledger.ack(name, "t", -1, 1, 1) end

      assert_raise ArgumentError, ~r/connection/, fn ->
        Acknowledger.get_latest_offset("c", "t", 0)
      end
    end
  end

  describe "consumer without a group" do
    test "reads the given partitions from begin_offset, commits nothing" do
      topic = create_topic!(partitions: 3)
      produce_spread!(topic, 3, 10)
      name = conn_name()

      start_supervised!(
        {Ottla.Supervisor,
         connection: name,
         endpoints: endpoints(),
         consumer: [
           topic: topic,
           partition: :all,
           begin_offset: :earliest,
           handler: Ottla.TestHandler,
           handler_init_args: %{pid: self()}
         ]}
      )

      delivered =
        collect_batches(fn acc -> Enum.sum(Enum.map(acc, fn {_, l} -> length(l) end)) >= 30 end)

      assert delivered == all_offsets(3, 10)
      assert Acknowledger.get_latest_offset(name, topic, 2) == 10
    end

    test "starts at an explicit offset of one partition" do
      topic = create_topic!(partitions: 2)
      produce_spread!(topic, 2, 10)

      start_supervised!(
        {Ottla.Supervisor,
         connection: conn_name(),
         endpoints: endpoints(),
         consumer: [
           topic: topic,
           partition: 1,
           begin_offset: 7,
           handler: Ottla.TestHandler,
           handler_init_args: %{pid: self()}
         ]}
      )

      assert_receive {:batch, _, _, 1, [first | _] = messages}, 30_000
      assert first.offset == 7
      assert first.generation_id == nil
      seen = Enum.map(messages, & &1.offset)
      rest = collect_batches(fn acc -> length(seen ++ Map.get(acc, 1, [])) >= 3 end)
      assert seen ++ Map.get(rest, 1, []) == [7, 8, 9]
      assert Map.delete(rest, 1) == %{}
    end
  end

  # [1, 2, 3, 7, 8] -> [1..3, 7..8], for readable failure messages.
  defp ranges(offsets) do
    Enum.chunk_while(
      offsets,
      nil,
      fn
        o, nil -> {:cont, {o, o}}
        o, {a, b} when o == b + 1 -> {:cont, {a, o}}
        o, {a, b} -> {:cont, a..b, {o, o}}
      end,
      fn
        nil -> {:cont, nil}
        {a, b} -> {:cont, a..b, nil}
      end
    )
  end

  defp gen_of(conn, partition) do
    {:ok, %{partitions: ps}} = Ottla.stats(conn)
    Enum.find(ps, &(&1.partition == partition)).generation_id
  end
end
