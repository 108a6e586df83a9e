defmodule Ottla.FailurePolicyTest do
  use ExUnit.Case, async: true

  import ExUnit.CaptureLog
  import Ottla.TestSupport

  @moduletag timeout: 240_000

  # A handler that fails every batch holding a poison offset and reports each batch it
  # handled: {:handled, partition, offsets, attempt} or {:failed, partition, offsets, attempt}.
  defp poison_handler(me, poison?) do
    fn messages, s ->
      offsets = Enum.map(messages, & &1.offset)
      p = Ottla.TestHandler.partition()
      attempt = Ottla.Consumer.MessageHandler.attempt()

      if Enum.any?(offsets, &poison?.(p, &1)) do
        send(me, {:failed, p, offsets, attempt})
        raise "poison in #{inspect(offsets)}"
      else
        send(me, {:handled, p, offsets, attempt})
        {:ack, s}
      end
    end
  end

  defp now, do: System.monotonic_time(:millisecond)

  defp produce_per_partition!(topic, partitions, count) do
    for p <- 0..(partitions - 1) do
      msgs = for i <- 0..(count - 1), do: {"k#{p}-#{i}", "v#{p}-#{i}"}
      assert :ok = Ottla.produce(endpoints(), topic, msgs, partition: p)
    end
  end

  # Collects {:handled, p, offsets, _} until every non-poison offset was handled; returns
  # what was handled per partition, and the one-message failures as {p, offset, attempt}.
  defp collect_handled(expected, acc \\ %{}, singles \\ []) do
    if Enum.all?(expected, fn {p, offsets} -> Enum.sort(Map.get(acc, p, [])) == offsets end) do
      {acc, Enum.reverse(singles)}
    else
      receive do
        {:handled, p, offsets, _attempt} ->
          collect_handled(expected, Map.update(acc, p, offsets, &(&1 ++ offsets)), singles)

        {:failed, p, [offset], attempt} ->
          collect_handled(expected, acc, [{p, offset, attempt} | singles])

        {:failed, _, _, _} ->
          collect_handled(expected, acc, singles)
      after
        90_000 ->
          flunk("handled so far: #{inspect(Map.new(acc, fn {p, l} -> {p, length(l)} end))}")
      end
    end
  end

  defp failed_attempts do
    receive do
      {:failed, p, [offset], attempt} -> [{p, offset, attempt} | failed_attempts()]
      {:failed, _p, _batch, _attempt} -> failed_attempts()
    after
      0 -> []
    end
  end

  describe "after max_attempts" do
    test "{:dead_letter, topic}: every other message handled once in order, the poison ones in the topic with headers" do
      topic = create_topic!(partitions: 2)
      dlq = create_topic!()
      produce_per_partition!(topic, 2, 1_500)
      group = group_name()
      me = self()
      poison? = fn _p, offset -> rem(offset, 1_000) == 337 end

      {conn, log} =
        with_log(fn ->
          conn =
            start_group!(topic, group,
              max_batch: 100,
              max_attempts: 3,
              on_failure: {:dead_letter, dlq},
              retry_backoff: 10,
              max_retry_backoff: 50,
              handler_init_args: %{pid: me, fun: poison_handler(me, poison?)}
            )

          good = Enum.reject(0..1_499, &poison?.(0, &1))
          {handled, _} = collect_handled(%{0 => good, 1 => good})

          for p <- 0..1 do
            assert handled[p] == good,
                   "partition #{p}: handled out of order or more than once " <>
                     "(#{length(handled[p])} handlings of #{length(good)} messages)"
          end

          wait_until(
            fn -> committed(group, topic) == %{0 => 1_500, 1 => 1_500} end,
            30_000,
            "commits to reach the end"
          )

          conn
        end)

      {:ok, _, dead} = Ottla.fetch(endpoints(), dlq)

      assert Enum.sort(Enum.map(dead, & &1.value)) == ["v0-1337", "v0-337", "v1-1337", "v1-337"]

      for m <- dead do
        headers = Map.new(m.headers)
        [_, p, offset] = Regex.run(~r/^v(\d)-(\d+)$/, m.value)
        assert m.key == "k#{p}-#{offset}"
        assert headers["ottla.source.topic"] == topic
        assert headers["ottla.source.partition"] == p
        assert headers["ottla.source.offset"] == offset
        assert headers["ottla.attempts"] == "3"
        assert headers["ottla.error"] =~ "poison"
        assert {:ok, _, _} = DateTime.from_iso8601(headers["ottla.failed_at"])
      end

      {:ok, stats} = Ottla.stats(conn)
      assert Enum.map(stats.partitions, & &1.dead_lettered) == [2, 2]
      # Started without a producer, the connection got one for its dead letters.
      assert %Ottla.Connection{producer: producer} = Ottla.Connection.lookup(conn)
      assert producer != nil
      assert log =~ "dead-lettered offset 337"
      refute log =~ "v0-337", "a payload was logged"
    end

    test ":skip: every other message handled once, the poison ones tried max_attempts times then acked" do
      topic = create_topic!()
      produce_per_partition!(topic, 1, 1_000)
      group = group_name()
      me = self()
      poison? = fn _p, offset -> offset in [337, 338, 900] end

      capture_log(fn ->
        conn =
          start_group!(topic, group,
            max_batch: 50,
            max_attempts: 3,
            on_failure: :skip,
            retry_backoff: 10,
            max_retry_backoff: 50,
            handler_init_args: %{pid: me, fun: poison_handler(me, poison?)}
          )

        good = Enum.reject(0..999, &poison?.(0, &1))
        {handled, singles} = collect_handled(%{0 => good})
        assert handled[0] == good
        wait_until(fn -> committed(group, topic) == %{0 => 1_000} end, 30_000, "commit of 1000")

        # Each poison message failed alone at attempts 2 and 3 (the batch was its first).
        singles = Enum.sort(singles ++ failed_attempts())

        assert singles == [
                 {0, 337, 2},
                 {0, 337, 3},
                 {0, 338, 2},
                 {0, 338, 3},
                 {0, 900, 2},
                 {0, 900, 3}
               ]

        {:ok, %{partitions: [p0]}} = Ottla.stats(conn)
        assert p0.skipped == 3
      end)
    end
  end

  test ":retry stalls only the poison message's partition; the other delivers everything" do
    topic = create_topic!(partitions: 2)
    produce_per_partition!(topic, 2, 100)
    group = group_name()
    me = self()
    poison? = fn p, offset -> p == 0 and offset == 40 end

    # Every try of the poison message (its batch first, then alone) is timed.
    handler = poison_handler(me, poison?)

    timed = fn [first | _] = messages, s ->
      if first.offset == 40,
        do: send(me, {:tried, Ottla.Consumer.MessageHandler.attempt(), now()})

      handler.(messages, s)
    end

    capture_log(fn ->
      conn =
        start_group!(topic, group,
          max_batch: 10,
          retry_backoff: 20,
          max_retry_backoff: 200,
          handler_init_args: %{pid: me, fun: timed}
        )

      {handled, _} = collect_handled(%{0 => Enum.to_list(0..39), 1 => Enum.to_list(0..99)})
      assert handled[1] == Enum.to_list(0..99)

      p0 =
        wait_until(
          fn ->
            {:ok, %{partitions: ps}} = Ottla.stats(conn)
            p0 = Enum.find(ps, &(&1.partition == 0))
            p0.failures >= 4 and p0
          end,
          30_000,
          "partition 0 to keep failing"
        )

      assert p0.last_acked == 39

      # After failure n the next try waits 20 ms doubled n - 1 times (at most 200), with
      # jitter between half of that and all of it.
      tries = for n <- 1..4, do: assert_receive({:tried, ^n, at}, 5_000) && at
      gaps = tries |> Enum.chunk_every(2, 1, :discard) |> Enum.map(fn [a, b] -> b - a end)

      for {gap, n} <- Enum.with_index(gaps, 1) do
        assert gap >= div(min(20 * Integer.pow(2, n - 1), 200), 2) - 1,
               "try #{n + 1} came #{gap} ms after try #{n} (gaps: #{inspect(gaps)})"
      end

      refute_receive {:handled, 0, _, _}, 500
      wait_until(fn -> committed(group, topic) == %{0 => 40, 1 => 100} end, 15_000, "commits")
    end)
  end

  test "a revoke during a 30 s backoff completes within drain_timeout + 1 s" do
    topic = create_topic!(partitions: 2)
    produce_per_partition!(topic, 2, 10)
    group = group_name()
    me = self()

    capture_log(fn ->
      a =
        start_group!(topic, group,
          id: :a,
          drain_timeout: 2_000,
          assignment_strategy: :range,
          retry_backoff: 30_000,
          max_retry_backoff: 30_000,
          handler_init_args: %{pid: me, fun: poison_handler(me, fn _, _ -> true end)}
        )

      wait_until(
        fn ->
          {:ok, %{partitions: ps}} = Ottla.stats(a)
          length(ps) == 2 and Enum.all?(ps, &(is_integer(&1.backoff) and &1.backoff >= 15_000))
        end,
        30_000,
        "both partitions in a long backoff"
      )

      start_group!(topic, group, id: :b, assignment_strategy: :range)

      stats = wait_for_revoke!(a)

      assert stats.last_revoke_duration <= 3_000,
             "the revoke took #{stats.last_revoke_duration} ms with a drain_timeout of 2000 ms"
    end)
  end

  test "{:seek, offset, state} goes on forwards and backwards; what was fetched before is never delivered" do
    topic = create_topic!()
    produce_per_partition!(topic, 1, 100)
    group = group_name()
    me = self()
    {:ok, seeks} = Agent.start_link(fn -> [50, 20] end)

    fun = fn [first | _] = messages, s ->
      send(me, {:handled, 0, Enum.map(messages, & &1.offset), 1})

      case {first.offset, Agent.get(seeks, & &1)} do
        {0, [50 | rest]} ->
          Agent.update(seeks, fn _ -> rest end)
          {:seek, 50, s}

        {60, [20 | rest]} ->
          Agent.update(seeks, fn _ -> rest end)
          {:seek, 20, s}

        _ ->
          {:ack, s}
      end
    end

    conn = start_group!(topic, group, max_batch: 10, handler_init_args: %{pid: me, fun: fun})

    batches =
      Enum.map(1..11, fn _ ->
        assert_receive {:handled, 0, offsets, _}, 30_000
        offsets
      end)

    assert Enum.map(batches, &hd/1) == [0, 50, 60, 20, 30, 40, 50, 60, 70, 80, 90]
    wait_until(fn -> committed(group, topic) == %{0 => 100} end, 15_000, "commit of 100")
    {:ok, %{partitions: [p0]}} = Ottla.stats(conn)
    assert p0.last_seek == 20
  end

  describe "offsets kept elsewhere" do
    test "every message's effect is recorded exactly once across a rebalance and a member restart; nothing is committed to Kafka" do
      topic = create_topic!(partitions: 4)
      produce_per_partition!(topic, 4, 200)
      group = group_name()
      {:ok, db} = Agent.start_link(fn -> %{offsets: %{}, effects: []} end)
      me = self()

      # The "database": effects and the next offset change in one transaction, on the
      # README's condition that the stored offset is still the batch's first (a batch whose
      # claim fails was applied by whoever moved the offset: rolled back).
      fun = fn [first | _] = messages, s ->
        p = Ottla.TestHandler.partition()
        Process.sleep(20)

        Agent.update(db, fn db ->
          if Map.get(db.offsets, p, 0) == first.offset do
            effects = Enum.map(messages, &{p, &1.offset})
            next = List.last(messages).offset + 1
            %{db | effects: effects ++ db.effects, offsets: Map.put(db.offsets, p, next)}
          else
            db
          end
        end)

        {:ack, s}
      end

      stored = fn _topic, p -> Agent.get(db, &Map.get(&1.offsets, p)) end

      opts = [
        max_batch: 10,
        offsets: {:elsewhere, stored},
        handler_init_args: %{pid: me, fun: fun}
      ]

      count = fn -> Agent.get(db, &length(&1.effects)) end

      start_group!(topic, group, [id: :a] ++ opts)
      wait_until(fn -> count.() >= 100 end, 30_000, "a first share of the effects")
      start_group!(topic, group, [id: :b] ++ opts)
      wait_until(fn -> count.() >= 400 end, 60_000, "effects after the rebalance")
      stop_supervised!(:a)
      start_group!(topic, group, [id: :a2] ++ opts)
      wait_until(fn -> count.() >= 800 end, 90_000, "every effect")
      # Stopped members have finished every batch: nothing can be recorded after this.
      stop_supervised!(:b)
      stop_supervised!(:a2)

      effects = Agent.get(db, & &1.effects)
      dupes = effects -- Enum.uniq(effects)
      assert dupes == [], "effects recorded twice: #{inspect(Enum.take(dupes, 10))}"
      assert Enum.sort(effects) == for(p <- 0..3, o <- 0..199, do: {p, o})
      assert committed(group, topic) == %{0 => nil, 1 => nil, 2 => nil, 3 => nil}
    end

    test "an offsets function that raises backs off and is tried again without stopping the consumer" do
      topic = create_topic!()
      produce_per_partition!(topic, 1, 5)
      {:ok, calls} = Agent.start_link(fn -> 0 end)

      stored = fn _topic, _p ->
        if Agent.get_and_update(calls, &{&1 + 1, &1 + 1}) <= 2, do: raise("database down")
        nil
      end

      log =
        capture_log(fn ->
          conn =
            start_group!(topic, group_name(),
              retry_backoff: 50,
              offsets: {:elsewhere, stored}
            )

          manager = Ottla.Group.Manager.resource(conn)
          assert_receive {:batch, _, _, 0, messages}, 30_000
          assert hd(messages).offset == 0
          assert Ottla.Group.Manager.resource(conn) == manager, "the consumer was restarted"
        end)

      assert Agent.get(calls, & &1) == 3
      assert log =~ "the :offsets function failed"
      assert log =~ "database down"
    end
  end
end
