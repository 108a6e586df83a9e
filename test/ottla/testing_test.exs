defmodule Ottla.TestingTest do
  use ExUnit.Case, async: true

  describe "the embedded mock cluster" do
    test "supports create, list, produce and fetch" do
      {:ok, endpoints} = Ottla.Testing.start_mock_cluster(brokers: 1)
      assert [{"127.0.0.1", port}] = endpoints
      assert is_integer(port)

      assert :ok = Ottla.create_topic(endpoints, "mocked", partitions: 2)
      assert {:ok, [{"mocked", 2}]} = Ottla.list_topics(endpoints)
      assert :ok = Ottla.produce(endpoints, "mocked", [{"k", "v1"}, {"k", "v2"}], partition: 1)
      assert {:ok, 2, [a, b]} = Ottla.fetch(endpoints, "mocked", partition: 1)
      assert {a.value, b.value} == {"v1", "v2"}
      assert :ok = Ottla.Testing.stop_mock_cluster(endpoints)
    end

    test "can have several brokers" do
      {:ok, endpoints} = Ottla.Testing.start_mock_cluster(brokers: 3)
      assert length(endpoints) == 3
    end

    test "deleting a topic on it says the mock cannot" do
      {:ok, endpoints} = Ottla.Testing.start_mock_cluster()
      :ok = Ottla.create_topic(endpoints, "t")
      assert {:error, %Ottla.Error{code: :unsupported}} = Ottla.delete_topic(endpoints, "t")
    end

    test "works under start_supervised" do
      pid = start_supervised!({Ottla.Testing, brokers: 1})
      endpoints = Ottla.Testing.endpoints(pid)
      assert {:ok, []} = Ottla.list_topics(endpoints)
    end

    test "runs a consumer group, as users' own tests would" do
      {:ok, endpoints} = Ottla.Testing.start_mock_cluster()
      :ok = Ottla.create_topic(endpoints, "orders", partitions: 2)
      :ok = Ottla.produce(endpoints, "orders", [{"a", "1"}, {"b", "2"}, {"c", "3"}])

      start_supervised!(
        {Ottla.Supervisor,
         connection: :mock_group_test,
         endpoints: endpoints,
         group_consumer: [
           group: "g",
           topics: ["orders"],
           handler: Ottla.TestHandler,
           handler_init_args: %{pid: self()},
           begin_offset: :earliest
         ]}
      )

      delivered =
        Ottla.TestSupport.collect_batches(
          fn acc -> Enum.sum(Enum.map(acc, fn {_, l} -> length(l) end)) >= 3 end,
          15_000
        )

      assert delivered |> Map.values() |> List.flatten() |> length() == 3

      Ottla.TestSupport.wait_until(
        fn ->
          {:ok, committed} = Ottla.committed_offsets(endpoints, "g", "orders")
          # A partition that got no message has nothing committed (nil).
          committed |> Enum.map(fn {_, c} -> c || 0 end) |> Enum.sum() == 3
        end,
        10_000,
        "the group's commits on the mock cluster"
      )
    end

    test "a member that stops does not hold its partitions from the next member for long" do
      {:ok, endpoints} = Ottla.Testing.start_mock_cluster()
      :ok = Ottla.create_topic(endpoints, "handover", partitions: 1)
      :ok = Ottla.produce(endpoints, "handover", "before")

      member = fn id ->
        {Ottla.Supervisor,
         connection: id,
         endpoints: endpoints,
         group_consumer: [
           group: "handover",
           topics: ["handover"],
           handler: Ottla.TestHandler,
           handler_init_args: %{pid: self()},
           begin_offset: :earliest
         ]}
      end

      start_supervised!(member.(:mock_first), id: :first)
      assert_receive {:batch, _, _, 0, [%{value: "before"}]}, 15_000
      stop_supervised!(:first)

      :ok = Ottla.produce(endpoints, "handover", "after")
      started = System.monotonic_time(:millisecond)
      start_supervised!(member.(:mock_second), id: :second)
      assert_receive {:batch, _, _, 0, [%{value: "after"}]}, 15_000
      waited = System.monotonic_time(:millisecond) - started
      # librdkafka's own session timeout default (45 s) would make this ~44 s.
      assert waited < 15_000
    end

    test "rejects a bad :brokers option" do
      assert_raise ArgumentError, ~r/:brokers/, fn ->
        Ottla.Testing.start_mock_cluster(brokers: 0)
      end

      # librdkafka would abort the VM trying to open that many brokers.
      assert_raise ArgumentError, ~r/:brokers/, fn ->
        Ottla.Testing.start_mock_cluster(brokers: 100_000)
      end
    end
  end
end
