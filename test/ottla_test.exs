defmodule OttlaTest do
  use ExUnit.Case, async: true

  import Ottla.TestSupport

  @unreachable [{"127.0.0.1", 1}]

  describe "topic admin against the real broker" do
    test "create_topic makes a topic that list_topics and topic? see, with its partitions" do
      topic = unique_topic()
      assert :ok = Ottla.create_topic(endpoints(), topic, partitions: 3)
      assert {:ok, topics} = Ottla.list_topics(endpoints())
      assert {topic, 3} in topics, "expected {#{topic}, 3} in #{inspect(topics)}"
      assert Ottla.topic?(endpoints(), topic)
    end

    test "create_topic passes topic config and replicas" do
      topic = unique_topic()

      assert :ok =
               Ottla.create_topic(endpoints(), topic,
                 partitions: 2,
                 replicas: 1,
                 config: ["retention.ms": 60_000, "cleanup.policy": "delete"]
               )

      assert Ottla.topic?(endpoints(), topic)
    end

    test "delete_topic removes the topic" do
      topic = create_topic!()
      assert :ok = Ottla.delete_topic(endpoints(), topic)
      refute Ottla.topic?(endpoints(), topic)
      assert {:ok, topics} = Ottla.list_topics(endpoints())
      refute List.keymember?(topics, topic, 0)
    end

    test "creating an existing topic is a topic_already_exists error" do
      topic = create_topic!()

      assert {:error, %Ottla.Error{code: :topic_already_exists, retriable?: false}} =
               Ottla.create_topic(endpoints(), topic)
    end

    test "deleting an unknown topic is an unknown_topic_or_partition error" do
      assert {:error, %Ottla.Error{code: :unknown_topic_or_partition}} =
               Ottla.delete_topic(endpoints(), unique_topic())
    end

    test "create_partitions grows a topic, and produce reaches the new partitions; shrinking is an error" do
      topic = create_topic!(partitions: 2)
      assert :ok = Ottla.create_partitions(endpoints(), topic, 4)
      assert {:ok, topics} = Ottla.list_topics(endpoints())
      assert {topic, 4} in topics
      assert :ok = Ottla.produce(endpoints(), topic, {"k", "v"}, partition: 3)
      assert {:ok, 1, [%{value: "v"}]} = Ottla.fetch(endpoints(), topic, partition: 3)

      assert {:error, %Ottla.Error{code: :invalid_partitions}} =
               Ottla.create_partitions(endpoints(), topic, 3)

      assert {:error, %Ottla.Error{code: :unknown_topic_or_partition}} =
               Ottla.create_partitions(endpoints(), unique_topic(), 3)

      assert_raise ArgumentError, ~r/:partitions/, fn ->
        Ottla.create_partitions(endpoints(), topic, 0)
      end
    end

    test "topic? is false for a topic that does not exist" do
      refute Ottla.topic?(endpoints(), unique_topic())
    end

    test "endpoints may be a keyword list, tuples or a string" do
      [host, port] = String.split(endpoints(), ":")
      port = String.to_integer(port)

      for eps <- [[{String.to_atom(host), port}], [{host, port}], [{to_charlist(host), port}]] do
        assert {:ok, _} = Ottla.list_topics(eps)
      end
    end
  end

  describe "produce and fetch against the real broker" do
    test "a single value is produced and fetched back with its offset" do
      topic = create_topic!()
      assert :ok = Ottla.produce(endpoints(), topic, "hello")
      assert {1, [msg]} = fetch_all!(topic, 0)

      assert %Ottla.Message{topic: ^topic, partition: 0, offset: 0, key: nil, value: "hello"} =
               msg

      assert is_integer(msg.timestamp)
    end

    test "a list of keyed messages keeps order, keys and values, and the high watermark counts them" do
      topic = create_topic!()
      messages = for i <- 1..20, do: {"key-#{i}", "value-#{i}"}
      assert :ok = Ottla.produce(endpoints(), topic, messages)
      assert {20, fetched} = fetch_all!(topic, 0)
      assert Enum.map(fetched, & &1.offset) == Enum.to_list(0..19)
      assert Enum.map(fetched, &{&1.key, &1.value}) == messages
    end

    test "headers and timestamps of map messages arrive as sent" do
      topic = create_topic!()
      ts = System.system_time(:millisecond) - 60_000

      assert :ok =
               Ottla.produce(endpoints(), topic, %{
                 key: "k",
                 value: "v",
                 headers: [{"trace", "abc"}, {"empty", nil}, {"trace", "again"}],
                 timestamp: ts
               })

      assert {1, [msg]} = fetch_all!(topic, 0)
      assert msg.headers == [{"trace", "abc"}, {"empty", nil}, {"trace", "again"}]
      assert msg.timestamp == ts
      assert {msg.key, msg.value} == {"k", "v"}
    end

    test "a nil value (tombstone) and a nil key are kept" do
      topic = create_topic!()
      assert :ok = Ottla.produce(endpoints(), topic, [{"gone", nil}, {nil, "no key"}])
      assert {2, [a, b]} = fetch_all!(topic, 0)
      assert {a.key, a.value} == {"gone", nil}
      assert {b.key, b.value} == {nil, "no key"}
    end

    test "keyed messages land on the partition the Java client would pick, every time" do
      topic = create_topic!(partitions: 8)
      keys = for i <- 1..40, do: "customer-#{i}"

      for round <- 1..2 do
        assert :ok = Ottla.produce(endpoints(), topic, Enum.map(keys, &{&1, "round #{round}"}))
      end

      seen =
        for p <- 0..7, {_, msgs} = fetch_all!(topic, p), m <- msgs, reduce: %{} do
          acc -> Map.update(acc, m.key, [p], &[p | &1])
        end

      for key <- keys do
        expected = java_partition(key, 8)

        assert Map.get(seen, key) == [expected, expected],
               "key #{key}: expected partition #{expected} twice, saw #{inspect(seen[key])}"
      end

      assert seen |> Map.values() |> List.flatten() |> Enum.uniq() |> length() > 1,
             "40 keys all landed on one partition"
    end

    test "an explicit :partition sends every message there" do
      topic = create_topic!(partitions: 4)
      assert :ok = Ottla.produce(endpoints(), topic, [{"a", "1"}, {"b", "2"}, "3"], partition: 2)
      # Messages the NIF reads as they are and messages encoded first (maps, iodata) alike.
      assert :ok =
               Ottla.produce(endpoints(), topic, [%{key: "c", value: "4"}, ["5"]], partition: 2)

      assert {5, msgs} = fetch_all!(topic, 2)
      assert Enum.map(msgs, & &1.value) == ["1", "2", "3", "4", "5"]
      for p <- [0, 1, 3], do: assert({0, []} == fetch_all!(topic, p))
    end

    test "the :md5 partitioner places keys as Elsa's did" do
      topic = create_topic!(partitions: 5)
      assert :ok = Ottla.produce(endpoints(), topic, {"elsa-key", "v"}, partitioner: :md5)
      expected = :crypto.hash(:md5, "elsa-key") |> :binary.bin_to_list() |> Enum.sum() |> rem(5)
      assert {1, [%{key: "elsa-key"}]} = fetch_all!(topic, expected)
    end

    test "a partitioner function gets the partition count and the key" do
      topic = create_topic!(partitions: 3)
      me = self()

      partitioner = fn count, key ->
        send(me, {:asked, count, key})
        2
      end

      assert :ok = Ottla.produce(endpoints(), topic, {"k", "v"}, partitioner: partitioner)
      assert_received {:asked, 3, "k"}
      assert {1, [_]} = fetch_all!(topic, 2)
    end

    test "the :random partitioner spreads messages over the partitions" do
      topic = create_topic!(partitions: 4)

      assert :ok =
               Ottla.produce(endpoints(), topic, for(i <- 1..200, do: "#{i}"),
                 partitioner: :random
               )

      counts = for p <- 0..3, do: elem(fetch_all!(topic, p), 0)
      assert Enum.sum(counts) == 200
      assert Enum.count(counts, &(&1 > 0)) >= 3, "partition counts: #{inspect(counts)}"
    end

    test "10,000 messages produced in one call all arrive" do
      topic = create_topic!(partitions: 3)
      messages = for i <- 1..10_000, do: {"k#{rem(i, 97)}", "message #{i}"}
      assert :ok = Ottla.produce(endpoints(), topic, messages)

      values =
        for p <- 0..2,
            {_, msgs} = fetch_all!(topic, p),
            m <- msgs,
            into: MapSet.new(),
            do: m.value

      assert MapSet.size(values) == 10_000,
             "expected 10000 distinct values, got #{MapSet.size(values)}"
    end

    test "fetch reads from an offset, and :earliest / :latest" do
      topic = create_topic!()
      assert :ok = Ottla.produce(endpoints(), topic, for(i <- 0..9, do: "m#{i}"))

      assert {:ok, 10, msgs} = Ottla.fetch(endpoints(), topic, offset: 7)
      assert Enum.map(msgs, &{&1.offset, &1.value}) == [{7, "m7"}, {8, "m8"}, {9, "m9"}]

      assert {:ok, 10, [first | _]} = Ottla.fetch(endpoints(), topic, offset: :earliest)
      assert first.offset == 0
      assert {:ok, 10, []} = Ottla.fetch(endpoints(), topic, offset: :latest)
      assert {:ok, 10, []} = Ottla.fetch(endpoints(), topic, offset: 10)
      assert {:ok, 10, two} = Ottla.fetch(endpoints(), topic, offset: 2, max_messages: 2)
      assert Enum.map(two, & &1.offset) == [2, 3]
    end

    test "fetch of an empty partition returns high watermark 0 and no messages" do
      topic = create_topic!(partitions: 2)
      assert {:ok, 0, []} = Ottla.fetch(endpoints(), topic, partition: 1)
    end
  end

  describe "errors" do
    test "producing to an unknown topic is an unknown_topic_or_partition error naming the failed messages" do
      topic = unique_topic()

      assert {:error, %Ottla.Error{code: :unknown_topic_or_partition} = error, failed} =
               Ottla.produce(endpoints(), topic, ["a", "b"], timeout: 5_000)

      assert [{"a", %Ottla.Error{code: :unknown_topic_or_partition} = a}, {"b", b}] = failed
      assert b == a
      refute a.possibly_persisted?, "a topic that does not exist was never written to"
      assert error.message =~ topic
    end

    test "producing to a partition the topic does not have fails each message with unknown_partition" do
      topic = create_topic!(partitions: 2)

      assert {:error, %Ottla.Error{code: :unknown_partition}, failed} =
               Ottla.produce(endpoints(), topic, ["a", "b"], partition: 5)

      assert [{"a", %Ottla.Error{code: :unknown_partition}}, {"b", %Ottla.Error{}}] = failed
      assert {0, []} = fetch_all!(topic, 0)
    end

    test "fetching an unknown topic or partition is an error" do
      assert {:error, %Ottla.Error{code: :unknown_topic_or_partition}} =
               Ottla.fetch(endpoints(), unique_topic())

      topic = create_topic!()

      assert {:error, %Ottla.Error{code: :unknown_partition}} =
               Ottla.fetch(endpoints(), topic, partition: 3)
    end

    test "an unreachable broker gives an error within the timeout instead of hanging" do
      for {call, fun} <- [
            list_topics: fn -> Ottla.list_topics(@unreachable, timeout: 1_000) end,
            create_topic: fn -> Ottla.create_topic(@unreachable, "t", timeout: 1_000) end,
            fetch: fn -> Ottla.fetch(@unreachable, "t", timeout: 1_000) end,
            produce: fn -> Ottla.produce(@unreachable, "t", "x", timeout: 1_000) end
          ] do
        {micros, result} = :timer.tc(fun)

        assert match?({:error, %Ottla.Error{retriable?: true}}, result) or
                 match?(
                   {:error, %Ottla.Error{retriable?: true},
                    [{"x", %Ottla.Error{retriable?: true}}]},
                   result
                 ),
               "#{call}: #{inspect(result)}"

        assert micros < 5_000_000, "#{call} took #{div(micros, 1000)} ms with a 1000 ms timeout"
      end
    end

    test "a produce whose messages are still queued at its timeout returns then, naming each as possibly persisted" do
      name = conn_name()

      # linger.ms of a minute keeps the message in librdkafka's queue past the call's timeout.
      start_supervised!(
        {Ottla.Supervisor,
         connection: name,
         endpoints: endpoints(),
         producer: [config: ["linger.ms": 60_000, "message.timeout.ms": 120_000]]}
      )

      topic = create_topic!()

      {micros, result} = :timer.tc(fn -> Ottla.produce(name, topic, ["a", "b"], timeout: 500) end)

      assert {:error, %Ottla.Error{code: :timed_out, possibly_persisted?: true},
              [{"a", %Ottla.Error{possibly_persisted?: true}}, {"b", _}]} = result

      assert micros < 1_000_000, "returned after #{div(micros, 1000)} ms with a 500 ms timeout"
      # The abandoned call leaves nothing behind in the caller's mailbox.
      refute_receive {:ottla_produced, _, _}, 200
    end

    test "a produce that cannot be made at all returns by its timeout with every message named" do
      name = conn_name()

      start_supervised!(
        {Ottla.Supervisor, connection: name, endpoints: @unreachable, producer: []}
      )

      for target <- [name, @unreachable] do
        {micros, result} =
          :timer.tc(fn -> Ottla.produce(target, "t", ["a", {"k", "b"}], timeout: 1_000) end)

        assert {:error, %Ottla.Error{retriable?: true},
                [{"a", %Ottla.Error{possibly_persisted?: false}}, {{"k", "b"}, %Ottla.Error{}}]} =
                 result

        assert micros < 1_300_000, "returned after #{div(micros, 1000)} ms with a 1000 ms timeout"
      end
    end

    test "topic? raises Ottla.Error when the cluster cannot be asked" do
      assert_raise Ottla.Error, fn -> Ottla.topic?(@unreachable, "t") end
    end

    test "bad arguments raise ArgumentError naming the argument" do
      ep = endpoints()

      for {fun, name} <- [
            {fn -> Ottla.produce(ep, :not_a_topic, "x") end, "topic"},
            {fn -> Ottla.produce(ep, "", "x") end, "topic"},
            {fn -> Ottla.produce(ep, "t", 42) end, "messages"},
            {fn -> Ottla.produce(ep, "t", [{"k", 1}]) end, "messages"},
            {fn -> Ottla.produce(ep, "t", %{value: "v", headers: [1]}) end, "headers"},
            {fn -> Ottla.produce(ep, "t", "x", partition: -1) end, ":partition"},
            {fn -> Ottla.produce(ep, "t", "x", partitioner: :nope) end, ":partitioner"},
            {fn -> Ottla.produce(ep, "t", "x", timeout: 0) end, ":timeout"},
            {fn -> Ottla.produce(ep, "t", "x", bogus: 1) end, "bogus"},
            {fn -> Ottla.produce("localhost", "t", "x") end, ":endpoints"},
            {fn -> Ottla.produce([{"h", 70_000}], "t", "x") end, ":endpoints"},
            {fn -> Ottla.produce([:nope], "t", "x") end, ":endpoints"},
            {fn -> Ottla.fetch(:no_such_connection, "t") end, "connection"},
            {fn -> Ottla.create_topic(ep, "t", partitions: 0) end, ":partitions"},
            {fn -> Ottla.create_topic(ep, "t", partitions: 2_147_483_647) end, ":partitions"},
            {fn -> Ottla.create_topic(ep, "t", replicas: 40_000) end, ":replicas"},
            {fn -> Ottla.create_topic(ep, "t", config: [{"a", %{}}]) end, ":config"},
            {fn -> Ottla.fetch(ep, "t", partition: -2) end, ":partition"},
            {fn -> Ottla.fetch(ep, "t", offset: :middle) end, ":offset"},
            {fn -> Ottla.list_topics(ep, :soon) end, "options"}
          ] do
        error = assert_raise ArgumentError, fun
        assert error.message =~ name, "expected #{inspect(name)} in: #{error.message}"
      end
    end

    test "a partitioner function returning a partition out of range raises ArgumentError" do
      topic = create_topic!(partitions: 2)

      assert_raise ArgumentError, ~r/:partitioner/, fn ->
        Ottla.produce(endpoints(), topic, {"k", "v"}, partitioner: fn _, _ -> 9 end)
      end
    end

    test "an unknown librdkafka property is an invalid_config error" do
      assert {:error, %Ottla.Error{code: :invalid_config} = error, [{"x", error}]} =
               Ottla.produce(endpoints(), "t", "x", config: ["no.such.property": 1])
    end
  end
end
