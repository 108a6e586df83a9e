defmodule Ottla.TestingHelpersTest do
  # Ottla.Testing's wait helpers on the embedded cluster: each returns once what it waits for
  # holds (shown by evidence other than the stats it reads: the handler's mailbox, the
  # group's commits as Kafka reports them), and fails naming what it saw when it does not.
  use ExUnit.Case, async: true

  import Ottla.TestSupport, only: [conn_name: 0]

  alias Ottla.Testing.TimeoutError

  setup do
    pid = start_supervised!({Ottla.Testing, brokers: 1})
    {:ok, endpoints: Ottla.Testing.endpoints(pid)}
  end

  defp start_group!(endpoints, topic, extra \\ []) do
    conn = conn_name()
    group = "g-#{conn}"

    start_supervised!(
      {Ottla.Supervisor,
       connection: conn,
       endpoints: endpoints,
       group_consumer:
         Keyword.merge(
           [
             group: group,
             topics: [topic],
             handler: Ottla.TestHandler,
             handler_init_args: %{pid: self()},
             begin_offset: :earliest
           ],
           extra
         )},
      id: conn
    )

    {conn, group}
  end

  # Every offset delivered so far, from the mailbox: {partition => [offset]}.
  defp delivered(acc \\ %{}) do
    receive do
      {:batch, _, _, p, messages} ->
        delivered(
          Map.update(
            acc,
            p,
            Enum.map(messages, & &1.offset),
            &(&1 ++ Enum.map(messages, fn m -> m.offset end))
          )
        )
    after
      0 -> acc
    end
  end

  describe "await_assignment/2" do
    test "returns every partition of the consumer's topics once it holds them", %{endpoints: e} do
      :ok = Ottla.create_topic(e, "t", partitions: 3)
      {conn, _} = start_group!(e, "t")

      assert Ottla.Testing.await_assignment(conn) == [{"t", 0}, {"t", 1}, {"t", 2}]
      # Held means delivered to: a message produced now reaches a handler.
      :ok = Ottla.produce(e, "t", {"k", "v"}, partition: 2)
      assert_receive {:batch, _, "t", 2, [%{value: "v"}]}, 5_000
    end

    test "waits for a count or named partitions", %{endpoints: e} do
      :ok = Ottla.create_topic(e, "t", partitions: 2)
      {conn, _} = start_group!(e, "t")

      assert length(Ottla.Testing.await_assignment(conn, partitions: 2)) == 2
      assert {"t", 1} in Ottla.Testing.await_assignment(conn, partitions: [{"t", 1}])
    end

    test "a consumer without a group: its listed partitions", %{endpoints: e} do
      :ok = Ottla.create_topic(e, "t", partitions: 2)
      conn = conn_name()

      start_supervised!(
        {Ottla.Supervisor,
         connection: conn,
         endpoints: e,
         consumer: [
           topic: "t",
           partition: 1,
           handler: Ottla.TestHandler,
           handler_init_args: %{pid: self()},
           begin_offset: :earliest
         ]}
      )

      assert Ottla.Testing.await_assignment(conn) == [{"t", 1}]
    end

    test "times out naming what it waited for and what the consumer holds", %{endpoints: e} do
      :ok = Ottla.create_topic(e, "t", partitions: 1)
      {conn, _} = start_group!(e, "t")
      [_] = Ottla.Testing.await_assignment(conn)

      error =
        assert_raise TimeoutError, fn ->
          Ottla.Testing.await_assignment(conn, partitions: [{"t", 5}], timeout: 200)
        end

      assert error.message =~ ~s|#{inspect(conn)} to hold [{"t", 5}]|
      assert error.message =~ ~s|it holds [{"t", 0}]|
    end

    test "a connection without a consumer times out saying so" do
      error =
        assert_raise TimeoutError, fn ->
          Ottla.Testing.await_assignment(:no_such_connection, timeout: 50)
        end

      assert error.message =~ "no running consumer"
    end

    test "bad arguments raise ArgumentError naming them" do
      assert_raise ArgumentError, ~r/partitions/, fn ->
        Ottla.Testing.await_assignment(:c, partitions: 0)
      end

      assert_raise ArgumentError, ~r/partitions/, fn ->
        Ottla.Testing.await_assignment(:c, partitions: [{"t", -1}])
      end

      assert_raise ArgumentError, ~r/timeout/, fn ->
        Ottla.Testing.await_assignment(:c, timeout: :soon)
      end

      assert_raise ArgumentError, ~r/bogus/, fn ->
        Ottla.Testing.await_assignment(:c, bogus: 1)
      end
    end
  end

  describe "await_acked/3" do
    test "a topic: returns once everything produced so far is acked", %{endpoints: e} do
      :ok = Ottla.create_topic(e, "t", partitions: 2)
      {conn, _} = start_group!(e, "t")
      :ok = Ottla.produce(e, "t", for(i <- 1..50, do: {"k#{i}", "v#{i}"}))

      assert :ok = Ottla.Testing.await_acked(conn, "t")
      # Acked means delivered: all 50 are in the mailbox already.
      assert delivered() |> Map.values() |> List.flatten() |> length() == 50
    end

    test "offsets: returns once each is acked", %{endpoints: e} do
      :ok = Ottla.create_topic(e, "t", partitions: 1)
      {conn, _} = start_group!(e, "t")
      :ok = Ottla.produce(e, "t", for(i <- 0..9, do: {"k", "v#{i}"}))

      assert :ok = Ottla.Testing.await_acked(conn, [{"t", 0, 4}])
      assert Enum.take(Map.get(delivered(), 0, []), 5) == [0, 1, 2, 3, 4]
    end

    test "times out with each pending partition's acked offset and lag", %{endpoints: e} do
      :ok = Ottla.create_topic(e, "t", partitions: 1)
      parent = self()

      {conn, _} =
        start_group!(e, "t",
          handler_init_args: %{
            pid: parent,
            fun: fn messages, state ->
              if Enum.any?(messages, &(&1.value == "stuck")),
                do: {:no_ack, state},
                else: {:ack, state}
            end
          }
        )

      :ok = Ottla.produce(e, "t", [{"k", "fine"}, {"k", "stuck"}])
      assert_receive {:batch, _, _, 0, _}, 5_000

      error =
        assert_raise TimeoutError, fn -> Ottla.Testing.await_acked(conn, "t", timeout: 1_000) end

      assert error.message =~ "to have acked t/0 up to 2"

      assert error.message =~
               ~r"t/0 last acked (nil|0), committed \S+, high watermark 2, lag [12]"
    end

    test "an offset not held times out saying so", %{endpoints: e} do
      :ok = Ottla.create_topic(e, "t", partitions: 1)
      {conn, _} = start_group!(e, "t")

      error =
        assert_raise TimeoutError, fn ->
          Ottla.Testing.await_acked(conn, [{"other", 0, 1}], timeout: 100)
        end

      assert error.message =~ "other/0 not held"
    end

    test "bad offsets raise ArgumentError naming them", %{endpoints: e} do
      assert_raise ArgumentError, ~r/offsets/, fn -> Ottla.Testing.await_acked(:c, []) end
      assert_raise ArgumentError, ~r/offsets/, fn -> Ottla.Testing.await_acked(:c, [{:t, 0}]) end

      :ok = Ottla.create_topic(e, "t")
      conn = conn_name()
      start_supervised!({Ottla.Supervisor, connection: conn, endpoints: e})

      assert_raise ArgumentError, ~r/missing.*does not exist/, fn ->
        Ottla.Testing.await_acked(conn, "missing")
      end
    end
  end

  describe "await_committed/3" do
    test "returns once Kafka has the group's commit of everything produced", %{endpoints: e} do
      :ok = Ottla.create_topic(e, "t", partitions: 2)
      {conn, group} = start_group!(e, "t")
      :ok = Ottla.produce(e, "t", [{"a", "1"}, {"b", "2"}], partition: 0)
      :ok = Ottla.produce(e, "t", [{"c", "3"}], partition: 1)

      assert :ok = Ottla.Testing.await_committed(conn, "t")
      assert {:ok, [{0, 2}, {1, 1}]} = Ottla.committed_offsets(e, group, "t")
    end

    test "an offset is committed once the commit is past it", %{endpoints: e} do
      :ok = Ottla.create_topic(e, "t", partitions: 1)
      {conn, group} = start_group!(e, "t")
      :ok = Ottla.produce(e, "t", for(i <- 0..3, do: {"k", "v#{i}"}))

      assert :ok = Ottla.Testing.await_committed(conn, [{"t", 0, 3}])
      assert {:ok, [{0, 4}]} = Ottla.committed_offsets(e, group, "t")
    end
  end

  describe "await_topic/3" do
    test "returns once the topic is listed with its partitions and usable", %{endpoints: e} do
      :ok = Ottla.create_topic(e, "t", partitions: 3)
      assert :ok = Ottla.Testing.await_topic(e, "t", partitions: 3)
      assert :ok = Ottla.produce(e, "t", "v", partition: 2)
    end

    test "times out naming the topic and what the cluster has", %{endpoints: e} do
      :ok = Ottla.create_topic(e, "t", partitions: 1)

      error =
        assert_raise TimeoutError, fn ->
          Ottla.Testing.await_topic(e, "t", partitions: 4, timeout: 100)
        end

      assert error.message =~ ~s|topic "t" with 4 partition(s)|
      assert error.message =~ "it has 1 partition(s)"
    end
  end
end
