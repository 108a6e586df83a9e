defmodule Ottla.TransactionTest do
  # Transactions against the real broker: Ottla.transaction/3 and a transactional
  # connection's produce calls.
  use ExUnit.Case, async: true

  import Ottla.TestSupport

  defp start_transactional!(opts \\ []) do
    name = Keyword.get(opts, :connection, conn_name())
    id = Keyword.get_lazy(opts, :transactional_id, fn -> "ottla-txn-#{name}" end)
    endpoints = Keyword.get(opts, :endpoints, endpoints())
    producer = [transactional_id: id, config: Keyword.get(opts, :config, [])]

    spec =
      Supervisor.child_spec(
        {Ottla.Supervisor, connection: name, endpoints: endpoints, producer: producer},
        id: name
      )

    start_supervised!(spec)
    name
  end

  # The values a read_committed reader sees once `count` are there: a commit returns when the
  # transaction coordinator has decided; the markers that make the messages readable follow.
  defp values(topic, count) do
    topic |> committed_messages(count) |> Enum.map(& &1.value)
  end

  defp committed_messages(topic, count) do
    wait_until(
      fn ->
        {_hw, messages} = fetch_all!(topic, 0)
        length(messages) >= count and messages
      end,
      15_000,
      "#{count} committed messages in #{topic}"
    )
  end

  test "messages to two topics become visible together on commit, never after a raise" do
    orders = create_topic!()
    audit = create_topic!()
    conn = start_transactional!()

    assert {:ok, :done} =
             Ottla.transaction(conn, fn ->
               assert :ok = Ottla.produce(conn, orders, {"o-1", "created"})
               assert :ok = Ottla.produce(conn, audit, {"o-1", "audit created"})

               # Delivered, but not committed: a read_committed reader sees none of it yet.
               assert {:ok, _, []} = Ottla.fetch(endpoints(), orders, timeout: 1_000)
               :done
             end)

    assert values(orders, 1) == ["created"]
    assert values(audit, 1) == ["audit created"]

    assert_raise RuntimeError, "boom", fn ->
      Ottla.transaction(conn, fn ->
        :ok = Ottla.produce(conn, orders, {"o-2", "never"})
        :ok = Ottla.produce(conn, audit, {"o-2", "never"})
        raise "boom"
      end)
    end

    # A later transaction commits past the aborted one: the aborted messages were written
    # (their offsets are taken) and are never read.
    assert {:ok, :ok} = Ottla.transaction(conn, fn -> Ottla.produce(conn, orders, "later") end)

    messages = committed_messages(orders, 2)
    assert Enum.map(messages, & &1.value) == ["created", "later"]
    assert List.last(messages).offset >= 4
    assert values(audit, 1) == ["audit created"]
  end

  test "readers see only committed messages, and a group commits past the transaction markers" do
    topic = create_topic!()
    conn = start_transactional!()

    assert {:ok, :ok} =
             Ottla.transaction(conn, fn -> Ottla.produce(conn, topic, ["c1", "c2"]) end)

    assert_raise RuntimeError, fn ->
      Ottla.transaction(conn, fn ->
        :ok = Ottla.produce(conn, topic, ["aborted"])
        raise "abort"
      end)
    end

    assert {:ok, :ok} = Ottla.transaction(conn, fn -> Ottla.produce(conn, topic, "c3") end)
    # c1 c2 (marker) aborted (marker) c3 (marker): the log ends at 7.
    [_, _, last] = committed_messages(topic, 3)
    assert last.offset == 5

    streamed = Ottla.Fetch.fetch_stream(endpoints(), topic) |> Enum.map(& &1.value)
    assert streamed == ["c1", "c2", "c3"]

    group = group_name()
    consumer = start_group!(topic, group)
    delivered = collect_batches(fn acc -> length(Map.get(acc, 0, [])) >= 3 end, 30_000)
    assert delivered == %{0 => [0, 1, 5]}

    # Everything is handled: the commit and the lag go past the last marker (a consumer that
    # committed "last acked + 1" would stay at 6 with a lag of 1 for good).
    wait_until(fn -> committed(group, topic) == %{0 => 7} end, 15_000, "a commit at 7")

    assert {:ok, %{partitions: [%{lag: 0, high_watermark: 7}]}} = Ottla.stats(consumer)
    refute_received {:batch, _, _, _, _}

    # A consumer that asks for read_uncommitted gets the aborted message too.
    dirty = conn_name()

    start_supervised!(
      Supervisor.child_spec(
        {Ottla.Supervisor,
         connection: dirty,
         endpoints: endpoints(),
         consumer: [
           topic: topic,
           partition: 0,
           begin_offset: :earliest,
           isolation_level: :read_uncommitted,
           handler: Ottla.TestHandler,
           handler_init_args: %{pid: self()}
         ]},
        id: dirty
      )
    )

    assert collect_batches(fn acc -> length(Map.get(acc, 0, [])) >= 4 end, 30_000) ==
             %{0 => [0, 1, 3, 5]}
  end

  test "a throw or an exit in the function aborts the transaction and goes on" do
    topic = create_topic!()
    conn = start_transactional!()

    assert catch_throw(
             Ottla.transaction(conn, fn ->
               :ok = Ottla.produce(conn, topic, "thrown")
               throw(:away)
             end)
           ) == :away

    assert catch_exit(
             Ottla.transaction(conn, fn ->
               :ok = Ottla.produce(conn, topic, "exited")
               exit(:gone)
             end)
           ) == :gone

    assert {:ok, :ok} = Ottla.transaction(conn, fn -> Ottla.produce(conn, topic, "kept") end)
    assert values(topic, 1) == ["kept"]
  end

  test "a produce call outside a transaction on a transactional connection is one of its own" do
    topic = create_topic!()
    conn = start_transactional!()

    assert :ok = Ottla.produce(conn, topic, ["a", "b"])
    assert values(topic, 2) == ["a", "b"]
  end

  test "concurrent transactions on one connection are serialised: their messages never interleave" do
    topic = create_topic!()
    conn = start_transactional!()

    run = fn who ->
      Ottla.transaction(conn, fn ->
        for i <- 1..4 do
          :ok = Ottla.produce(conn, topic, "#{who}#{i}", partition: 0)
          Process.sleep(20)
        end

        who
      end)
    end

    results =
      ["a", "b", "c"]
      |> Enum.map(fn who -> Task.async(fn -> run.(who) end) end)
      |> Task.await_many(30_000)

    assert Enum.sort(results) == [{:ok, "a"}, {:ok, "b"}, {:ok, "c"}]

    all = values(topic, 12)
    chunks = Enum.chunk_by(all, &String.first/1)
    assert length(chunks) == 3, "interleaved: #{inspect(all)}"
    assert Enum.all?(chunks, &(length(&1) == 4))
  end

  test "a caller killed inside its transaction has it aborted, and the next one goes ahead" do
    topic = create_topic!()
    conn = start_transactional!()
    test = self()

    {pid, ref} =
      spawn_monitor(fn ->
        Ottla.transaction(conn, fn ->
          :ok = Ottla.produce(conn, topic, "from the dead")
          send(test, :produced)
          Process.sleep(:infinity)
        end)
      end)

    assert_receive :produced, 10_000
    Process.exit(pid, :kill)
    assert_receive {:DOWN, ^ref, :process, ^pid, :killed}

    assert {:ok, :ok} =
             Ottla.transaction(conn, fn -> Ottla.produce(conn, topic, "alive") end,
               timeout: 15_000
             )

    [alive] = committed_messages(topic, 1)
    assert alive.value == "alive"
    # The dead caller's message was written and aborted (its marker follows it).
    assert alive.offset >= 2
  end

  test "a produce call that fails inside the function makes the transaction abort" do
    topic = create_topic!()
    conn = start_transactional!()

    assert {:error, %Ottla.Error{code: :unknown_partition} = error} =
             Ottla.transaction(conn, fn ->
               :ok = Ottla.produce(conn, topic, "written, then aborted")
               {:error, _, _} = Ottla.produce(conn, topic, "nowhere", partition: 99)
               :returned_normally
             end)

    assert error.message =~ "aborted"
    assert {:ok, :ok} = Ottla.transaction(conn, fn -> Ottla.produce(conn, topic, "after") end)
    [after_] = committed_messages(topic, 1)
    assert after_.value == "after"
    assert after_.offset >= 2
  end

  test "a produce call outside a transaction that raises aborts its transaction" do
    topic = create_topic!()
    conn = start_transactional!()

    assert_raise ArgumentError, ~r/:partitioner/, fn ->
      Ottla.produce(conn, topic, {"k", "v"}, partitioner: fn _, _ -> raise "no partition" end)
    end

    # Left open, it would hold up the next transaction until its timeout.
    assert {:ok, :ok} =
             Ottla.transaction(conn, fn -> Ottla.produce(conn, topic, "next") end, timeout: 5_000)

    assert values(topic, 1) == ["next"]
  end

  test "a transaction open too long is aborted before the broker times it out, and the producer goes on" do
    topic = create_topic!()
    conn = start_transactional!(config: ["transaction.timeout.ms": 1_500])

    # Aborted after 80% of the 1.5 s: the coordinator, had it timed the transaction out, would
    # have fenced the producer for good.
    assert {:error, %Ottla.Error{code: :timed_out} = error} =
             Ottla.transaction(conn, fn ->
               :ok = Ottla.produce(conn, topic, "too slow")
               Process.sleep(1_600)
               :late
             end)

    assert error.message =~ "transaction.timeout.ms"
    assert {:ok, :ok} = Ottla.transaction(conn, fn -> Ottla.produce(conn, topic, "next") end)
    assert values(topic, 1) == ["next"]
  end

  test "a fatal producer error other than fencing restarts the connection with a new producer" do
    topic = create_topic!()
    conn = start_transactional!()
    old = Ottla.Connection.lookup(conn)
    :ok = Ottla.Native.producer_test_fatal(old.producer)

    assert {:error, %Ottla.Error{code: :out_of_order_sequence_number}} =
             Ottla.transaction(conn, fn -> :ok end)

    wait_until(
      fn -> match?(%{pid: pid} when pid != old.pid, Ottla.Connection.lookup(conn)) end,
      15_000,
      "the connection's restart"
    )

    assert {:ok, :ok} = Ottla.transaction(conn, fn -> Ottla.produce(conn, topic, "again") end)
    assert values(topic, 1) == ["again"]
  end

  test "a connection restart inside a transaction fails it; nothing of it is visible" do
    topic = create_topic!()
    conn = start_transactional!()

    assert {:error, %Ottla.Error{code: :not_in_transaction}} =
             Ottla.transaction(conn, fn ->
               :ok = Ottla.produce(conn, topic, "before the restart")
               old = Ottla.Connection.lookup(conn).pid
               GenServer.stop(old, :test_restart)

               wait_until(fn ->
                 match?(%{pid: pid} when pid != old, Ottla.Connection.lookup(conn))
               end)

               {:error, %Ottla.Error{code: :not_in_transaction}, _} =
                 Ottla.produce(conn, topic, "after the restart")

               :returned_normally
             end)

    assert {:ok, :ok} = Ottla.transaction(conn, fn -> Ottla.produce(conn, topic, "next") end)
    assert values(topic, 1) == ["next"]
  end

  test "a second producer with the same transactional id fences the first, which stays fenced" do
    topic = create_topic!()
    id = "ottla-txn-fence-#{System.unique_integer([:positive])}"
    old = start_transactional!(transactional_id: id)
    assert {:ok, :ok} = Ottla.transaction(old, fn -> Ottla.produce(old, topic, "old") end)
    old_pid = Ottla.Connection.lookup(old).pid

    new = start_transactional!(transactional_id: id)
    assert {:ok, :ok} = Ottla.transaction(new, fn -> Ottla.produce(new, topic, "new") end)

    assert {:error, %Ottla.Error{code: :fenced, retriable?: false}} =
             Ottla.transaction(old, fn -> Ottla.produce(old, topic, "zombie") end)

    # And on every call after it, without a restart that would fence the newer one in turn.
    assert {:error, %Ottla.Error{code: :fenced}} = Ottla.transaction(old, fn -> :ok end)
    assert {:error, %Ottla.Error{code: :fenced}, _} = Ottla.produce(old, topic, "zombie")

    # Not restarted (a restart would fence the newer one in turn): the connection stays up
    # as it is, and the newer one goes on.
    ref = Process.monitor(old_pid)
    refute_receive {:DOWN, ^ref, _, _, _}, 1_000
    assert Ottla.Connection.lookup(old).pid == old_pid
    assert {:ok, :ok} = Ottla.transaction(new, fn -> Ottla.produce(new, topic, "newer") end)

    assert values(topic, 3) == ["old", "new", "newer"]
  end

  test "a transaction on an unreachable cluster returns by its :timeout" do
    conn = start_transactional!(endpoints: "127.0.0.1:1")
    started = System.monotonic_time(:millisecond)

    assert {:error, %Ottla.Error{code: :timed_out, retriable?: true}} =
             Ottla.transaction(conn, fn -> flunk("the transaction cannot have begun") end,
               timeout: 1_500
             )

    assert System.monotonic_time(:millisecond) - started < 1_500 + 1_000
    refute_received {:ottla_txn, _, _}
  end

  test "bad input gets a clear error" do
    topic = create_topic!()
    conn = start_transactional!()
    plain = conn_name()

    start_supervised!(
      Supervisor.child_spec(
        {Ottla.Supervisor, connection: plain, endpoints: endpoints(), producer: []},
        id: plain
      )
    )

    assert {:error, %Ottla.Error{code: :not_transactional}} =
             Ottla.transaction(plain, fn -> :ok end)

    assert {:error, %Ottla.Error{code: :no_connection}} =
             Ottla.transaction(:no_such_connection, fn -> :ok end)

    assert_raise ArgumentError, ~r/invalid fun/, fn ->
      Ottla.transaction(conn, fn _ -> :ok end)
    end

    assert_raise ArgumentError, ~r/invalid connection/, fn ->
      Ottla.transaction("x", fn -> :ok end)
    end

    assert_raise ArgumentError, ~r/:timeout/, fn ->
      Ottla.transaction(conn, fn -> :ok end, timeout: -1)
    end

    assert_raise ArgumentError, ~r/do not nest/, fn ->
      Ottla.transaction(conn, fn -> Ottla.transaction(conn, fn -> :ok end) end)
    end

    assert_raise ArgumentError, ~r/transactional_id/, fn ->
      Ottla.Supervisor.start_link(
        connection: conn_name(),
        endpoints: endpoints(),
        producer: [transactional_id: 1]
      )
    end

    assert_raise ArgumentError, ~r/transactional.id/, fn ->
      Ottla.produce(endpoints(), topic, "x", config: ["transactional.id": "t"])
    end

    # The failed nesting aborted its transaction; the connection goes on.
    assert {:ok, :ok} = Ottla.transaction(conn, fn -> Ottla.produce(conn, topic, "fine") end)
    assert values(topic, 1) == ["fine"]
  end
end
