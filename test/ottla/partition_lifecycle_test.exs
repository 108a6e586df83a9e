defmodule Ottla.PartitionLifecycleTest do
  # Where a partition's lifecycle crosses between Rust and Elixir: the stored-offset seek,
  # a graceful stop while acks come from other processes, a revoke while the manager is late,
  # and the assignment handler's single call. Each of these tests failed before the change
  # that made the Rust state machine the owner of the lifecycle.
  use ExUnit.Case, async: false

  import Ottla.TestSupport

  @moduletag timeout: 120_000

  # Kafka's OffsetFetch API key.
  @offset_fetch 9

  describe "offsets kept elsewhere" do
    test "with begin_offset :latest, a slow committed-offset query does not lose the messages after the stored offset" do
      {:ok, endpoints} = Ottla.Testing.start_mock_cluster(brokers: 1)
      topic = "stored-#{System.unique_integer([:positive])}"
      :ok = Ottla.create_topic(endpoints, topic, partitions: 1)
      :ok = Ottla.produce(endpoints, topic, Enum.map(0..9, &{"k", "v#{&1}"}), partition: 0)

      # librdkafka waits for the group's committed offsets before it starts fetching; a seek
      # made meanwhile is refused. The app's store says: go on from offset 4.
      :ok = Ottla.Testing.delay_requests(endpoints, 1, @offset_fetch, 3, 1_500)
      test_pid = self()

      start_supervised!(
        {Ottla.Supervisor,
         connection: conn_name(),
         endpoints: endpoints,
         group_consumer: [
           group: group_name(),
           topics: [topic],
           handler: Ottla.TestHandler,
           handler_init_args: %{pid: test_pid},
           begin_offset: :latest,
           offsets: {:elsewhere, fn _topic, _partition -> 4 end}
         ]}
      )

      delivered = collect_batches(fn acc -> length(Map.get(acc, 0, [])) >= 6 end, 30_000)
      assert delivered[0] == Enum.to_list(4..9), "delivered #{inspect(delivered[0])}"
    end

    test "an :offsets function that fails twice: assignment_received_handler runs once, then everything is delivered" do
      topic = create_topic!(partitions: 1)
      :ok = Ottla.produce(endpoints(), topic, Enum.map(0..4, &{"k", "v#{&1}"}), partition: 0)
      {:ok, tries} = Agent.start_link(fn -> 0 end)
      test_pid = self()

      stored = fn _topic, _partition ->
        if Agent.get_and_update(tries, &{&1, &1 + 1}) < 2, do: raise("store down"), else: nil
      end

      start_group!(topic, group_name(),
        retry_backoff: 50,
        offsets: {:elsewhere, stored},
        assignment_received_handler: fn _group, t, p, _gen ->
          send(test_pid, {:assigned, t, p})
          :ok
        end
      )

      delivered = collect_batches(fn acc -> length(Map.get(acc, 0, [])) >= 5 end, 30_000)
      assert delivered[0] == Enum.to_list(0..4)
      assert Agent.get(tries, & &1) >= 3
      assert_received {:assigned, ^topic, 0}
      refute_received {:assigned, ^topic, 0}, "assignment_received_handler ran again"
    end
  end

  describe "a graceful stop" do
    test "waits for acks made from another process after {:continue, state}, commits them, and the next start redelivers nothing" do
      topic = create_topic!(partitions: 1)
      group = group_name()
      :ok = Ottla.produce(endpoints(), topic, Enum.map(0..49, &{"k", "v#{&1}"}), partition: 0)
      test_pid = self()

      # The handler hands every batch to a task that acks it 500 ms later.
      continue = fn messages, state ->
        last = List.last(messages)
        %{topic: t, partition: p, generation_id: gen} = last
        conn = Process.get(:ottla_connection)

        spawn(fn ->
          Process.sleep(500)
          result = Ottla.Group.Acknowledger.ack(conn, t, p, gen, last.offset)
          send(test_pid, {:acked, last.offset, result})
        end)

        {:continue, state}
      end

      conn = start_group!(topic, group, handler_init_args: %{pid: test_pid, fun: continue})
      assert_receive {:batch, _, ^topic, 0, first}, 30_000
      # Stop while the task's ack is still to come.
      stop_supervised!(conn)
      last = List.last(first).offset
      assert_receive {:acked, ^last, :ok}, 2_000
      assert committed(group, topic)[0] == last + 1

      start_group!(topic, group)
      :ok = Ottla.produce(endpoints(), topic, [{"k", "v50"}], partition: 0)
      rest = collect_batches(fn acc -> List.last(Map.get(acc, 0, [-1])) == 50 end, 30_000)

      assert hd(rest[0]) == last + 1, "the restart redelivered #{hd(rest[0])}..#{last}"
    end
  end

  describe "a revoke" do
    test "while the manager is suspended, a moved partition's handler is stopped before its new owner starts on it" do
      topic = create_topic!(partitions: 2)
      group = group_name()

      for p <- 0..1,
          do:
            :ok =
              Ottla.produce(endpoints(), topic, Enum.map(0..99, &{"k", "v#{&1}"}), partition: p)

      test_pid = self()

      # Each batch is held for 4 s; every handler run reports its start and end.
      slow = fn [m | _], state ->
        send(test_pid, {:run, :start, state.member, m.partition, now()})
        Process.sleep(4_000)
        send(test_pid, {:run, :end, state.member, m.partition, now()})
        {:ack, state}
      end

      opts = fn member ->
        [
          connection: :"#{member}_#{System.unique_integer([:positive])}",
          id: member,
          max_batch: 10,
          drain_timeout: 1_000,
          handler_init_args: %{pid: test_pid, member: member, fun: slow}
        ]
      end

      a = start_group!(topic, group, opts.(:a))
      assert_receive {:run, :start, :a, _, _}, 30_000
      assert_receive {:run, :start, :a, _, _}, 30_000
      manager = manager(a)
      :sys.suspend(manager)

      try do
        start_group!(topic, group, opts.(:b))
        assert_receive {:run, :start, :b, moved, b_started}, 30_000

        # Every run of a on the moved partition ended before b's first run on it began, and
        # none follows.
        Process.sleep(4_500)
        a_runs = for {:run, kind, :a, ^moved, at} <- mailbox(), do: {kind, at}

        for {:end, at} <- a_runs do
          assert at < b_started,
                 "a's handler ran on partition #{moved} until #{at}, b began at #{b_started}"
        end

        refute Enum.any?(a_runs, fn {kind, at} -> kind == :start and at >= b_started end)
      after
        :sys.resume(manager)
      end
    end
  end

  describe "deadlines" do
    test "a revocation's deadline is on Erlang's monotonic clock, as the consumer's own threads read it" do
      topic = create_topic!(partitions: 1)
      conn = start_group!(topic, group_name())
      resource = Ottla.Group.Manager.resource(conn)
      # enif_monotonic_time answers only on scheduler threads: read on the poll thread it
      # gave ERL_NIF_TIME_ERROR, so every revoke killed busy workers and the revoked handler
      # at once.
      clock = Ottla.Native.consumer_clock_ms(resource)
      assert abs(clock - System.monotonic_time(:millisecond)) < 1_000, "clock read #{clock}"
    end
  end

  defp now, do: System.monotonic_time(:millisecond)

  defp mailbox do
    receive do
      message -> [message | mailbox()]
    after
      0 -> []
    end
  end

  defp manager(conn) do
    [{sup, _}] = Registry.lookup(Ottla.Registry, {Ottla.Supervisor, conn})

    Enum.find_value(Supervisor.which_children(sup), fn
      {{Ottla.Group.Manager, :group}, pid, _, _} -> pid
      _ -> nil
    end)
  end
end
