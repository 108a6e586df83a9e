defmodule Ottla.ElsaMigrationTest do
  # What an Elsa app relies on, renamed to Ottla, against the real broker.
  use ExUnit.Case, async: true

  import ExUnit.CaptureLog
  import Ottla.TestSupport

  @moduletag timeout: 240_000

  describe "Elsa-style configuration" do
    test "a supervisor started with brod option names consumes and produces" do
      topic = create_topic!(partitions: 2)
      name = conn_name()

      start_supervised!(
        {Ottla.Supervisor,
         connection: name,
         endpoints: [{"127.0.0.1", port()}],
         config: [client_id: "elsa-app", connect_timeout: 5_000, request_timeout: 10_000],
         producer: [
           topic: topic,
           poll: 30_000,
           config: [
             required_acks: -1,
             ack_timeout: 5_000,
             max_retries: 3,
             retry_backoff_ms: 100,
             compression: :gzip,
             max_linger_ms: 5,
             max_linger_count: 100
           ]
         ],
         group_consumer: [
           group: group_name(),
           topics: [topic],
           handler: Ottla.TestHandler,
           handler_init_args: %{pid: self()},
           config: [
             begin_offset: :earliest,
             offset_reset_policy: :reset_to_earliest,
             prefetch_count: 100,
             prefetch_bytes: 1_048_576,
             max_bytes: 1_048_576,
             min_bytes: 1,
             max_wait_time: 100,
             session_timeout_seconds: 10,
             heartbeat_rate_seconds: 1,
             offset_commit_interval_seconds: 1,
             offset_commit_policy: :commit_to_kafka_v2
           ]
         ]}
      )

      assert :ok = Ottla.produce(name, topic, [{"a", "1"}, {"b", "2"}, {"c", "3"}])

      delivered =
        collect_batches(fn acc -> Enum.sum(Enum.map(acc, fn {_, l} -> length(l) end)) >= 3 end)

      assert delivered |> Map.values() |> List.flatten() |> length() == 3
    end

    test "brod options without a librdkafka counterpart are accepted with one warning; others are refused" do
      log =
        capture_log(fn ->
          for _ <- 1..3 do
            assert [] = Ottla.Options.kafka_config!(query_api_versions: true)
          end
        end)

      # This test is the only user of that option: its one warning is here.
      assert length(String.split(log, "query_api_versions")) - 1 == 1
      assert log =~ "librdkafka asks brokers for their API versions"

      assert [{"security.protocol", "sasl_ssl"} | rest] =
               Ottla.Options.kafka_config!(
                 ssl: [cacertfile: "/ca.pem", verify: :verify_peer],
                 sasl: {:scram_sha_512, "user", "secret"}
               )

      assert {"ssl.ca.location", "/ca.pem"} in rest
      assert {"sasl.mechanism", "SCRAM-SHA-512"} in rest
      assert {"sasl.username", "user"} in rest

      error =
        assert_raise ArgumentError, fn ->
          Ottla.Options.kafka_config!(sasl: {:kerberos, "user", "secret"})
        end

      refute error.message =~ "secret", "the password appeared in: #{error.message}"

      group = [group: "g", topics: ["t"], handler: Ottla.TestHandler]

      for {config, option} <- [
            {[offset_commit_policy: :consumer_managed], "offsets"},
            {[compression: :brotli], "compression"},
            {[begin_offset: :middle], "begin_offset"}
          ] do
        error =
          assert_raise ArgumentError, fn ->
            Ottla.Supervisor.start_link(
              connection: conn_name(),
              endpoints: endpoints(),
              group_consumer: group ++ [config: config]
            )
          end

        assert error.message =~ option
      end
    end
  end

  describe "producing like Elsa" do
    test "keys and values may be iodata" do
      topic = create_topic!()

      assert :ok =
               Ottla.produce(endpoints(), topic, [{["k", ?1], ["v", ["a", ?b]]}, [["x", "y"]]])

      assert :ok = Ottla.produce(endpoints(), topic, %{key: ["m", "k"], value: ["m", "v"]})
      {3, messages} = fetch_all!(topic, 0)
      assert Enum.map(messages, &{&1.key, &1.value}) == [{"k1", "vab"}, {nil, "xy"}, {"mk", "mv"}]

      assert_raise ArgumentError, ~r/iodata/, fn ->
        Ottla.produce(endpoints(), topic, {"k", [:not_bytes]})
      end
    end

    test "partitioner modules place keys where their function says" do
      topic = create_topic!(partitions: 6)
      keys = for i <- 1..30, do: "key-#{i}"

      for {partitioner, expected} <- [
            {Ottla.Partitioner.Md5, &Ottla.Partitioner.Md5.partition(6, &1)},
            {Ottla.Partitioner.Default, &java_partition(&1, 6)},
            {Ottla.TestPartitioner, &Ottla.TestPartitioner.partition(6, &1)}
          ] do
        topic = create_topic!(partitions: 6)

        assert :ok =
                 Ottla.produce(endpoints(), topic, Enum.map(keys, &{&1, "v"}),
                   partitioner: partitioner
                 )

        for p <- 0..5 do
          {_, messages} = fetch_all!(topic, p)
          placed = Enum.map(messages, & &1.key) |> Enum.sort()
          wanted = keys |> Enum.filter(&(expected.(&1) == p)) |> Enum.sort()
          assert placed == wanted, "#{inspect(partitioner)} partition #{p}"
        end
      end

      assert_raise ArgumentError, ~r/:partitioner/, fn ->
        Ottla.produce(endpoints(), topic, {"k", "v"}, partitioner: String)
      end
    end

    test "produce with endpoints and a :connection that runs goes through that connection" do
      name = conn_name()

      start_supervised!(
        {Ottla.Supervisor, connection: name, endpoints: endpoints(), producer: []}
      )

      topic = create_topic!()
      # The endpoints cannot be reached: only the running connection can deliver.
      assert :ok =
               Ottla.produce([{"127.0.0.1", 1}], topic, "via the connection", connection: name)

      assert {1, [%{value: "via the connection"}]} = fetch_all!(topic, 0)
    end

    test "producing through a connection that does not run is an error value, not a raise" do
      assert {:error, %Ottla.Error{code: :no_connection} = error, [{"x", error}]} =
               Ottla.produce(:no_such_connection, "t", "x")
    end

    test "start_producer/2 adds a producer to a running connection; ready?/1 says so" do
      name = conn_name()
      start_supervised!({Ottla.Supervisor, connection: name, endpoints: endpoints()})
      topic = create_topic!()
      refute Ottla.Producer.ready?(name)

      assert {:error, %Ottla.Error{code: :no_producer}, _} =
               Ottla.Producer.produce(name, topic, "x")

      assert :ok = Ottla.Supervisor.start_producer(name, topic: topic, config: [max_linger_ms: 1])
      assert Ottla.Producer.ready?(name)
      assert :ok = Ottla.Producer.produce(name, topic, "x")
      assert :ok = Ottla.Supervisor.start_producer(name, topic: "another")
      assert {1, [%{value: "x"}]} = fetch_all!(topic, 0)
    end
  end

  describe "Ottla.Fetch" do
    test "fetch_stream over 3 partitions yields every message once, in offset order per partition" do
      topic = create_topic!(partitions: 3)

      for p <- 0..2 do
        :ok =
          Ottla.produce(endpoints(), topic, for(i <- 0..2_499, do: {"k#{p}-#{i}", "v"}),
            partition: p
          )
      end

      stream = Ottla.Fetch.fetch_stream(endpoints(), topic, chunk_size: 1_000)
      by_partition = stream |> Enum.to_list() |> Enum.group_by(& &1.partition, & &1.offset)

      for p <- 0..2 do
        assert by_partition[p] == Enum.to_list(0..2_499), "partition #{p}"
      end

      one =
        Ottla.Fetch.fetch_stream(endpoints(), topic,
          partition: 1,
          start_offset: 10,
          end_offset: 20
        )

      assert Enum.map(one, & &1.offset) == Enum.to_list(10..19)
    end

    test "search_keys and search_values find exactly the matching messages" do
      topic = create_topic!(partitions: 2)

      messages =
        for i <- 0..199, do: {"user-#{i}", if(rem(i, 10) == 0, do: "needle #{i}", else: "hay")}

      :ok = Ottla.produce(endpoints(), topic, messages ++ [{nil, "needle without key"}])

      keys = Ottla.Fetch.search_keys(endpoints(), topic, "user-1") |> Enum.map(& &1.key)

      assert Enum.sort(keys) ==
               Enum.sort(
                 for i <- 0..199, String.contains?("user-#{i}", "user-1"), do: "user-#{i}"
               )

      values = Ottla.Fetch.search_values(endpoints(), topic, "needle") |> Enum.map(& &1.value)
      assert length(values) == 21
      assert Enum.all?(values, &String.starts_with?(&1, "needle"))

      assert [%{value: "needle 150"}] =
               Ottla.Fetch.search(endpoints(), topic, &(&1.value == "needle 150"))
               |> Enum.to_list()
    end

    @tag timeout: 300_000
    test "streaming 1,000,000 messages keeps memory flat" do
      topic = create_topic!()
      value = String.duplicate("v", 100)

      for batch <- Enum.chunk_every(0..999_999, 50_000) do
        :ok = Ottla.produce(endpoints(), topic, Enum.map(batch, &{"k#{&1}", value}), partition: 0)
      end

      :erlang.garbage_collect()
      before = :erlang.memory(:total)
      me = self()

      sampler =
        spawn_link(fn ->
          sample = fn sample, peak ->
            receive do
              :stop -> send(me, {:peak, peak})
            after
              20 -> sample.(sample, max(peak, :erlang.memory(:total)))
            end
          end

          sample.(sample, 0)
        end)

      count =
        Ottla.Fetch.fetch_stream(endpoints(), topic, chunk_size: 10_000, timeout: 30_000)
        |> Enum.reduce(0, fn _message, n -> n + 1 end)

      send(sampler, :stop)
      assert_receive {:peak, peak}, 5_000
      assert count == 1_000_000
      growth = peak - before
      # Holding the messages would take well over 200 MB (100-byte values, keys, structs).
      assert growth < 80_000_000, "memory grew by #{div(growth, 1_000_000)} MB while streaming"
    end
  end

  describe "supervision" do
    test "Elsa's :name, the Ottla.Supervisor child id, and a consumer beside a group consumer" do
      topic = create_topic!(partitions: 2)
      group_topic = create_topic!()
      name = conn_name()
      me = self()

      pid =
        start_supervised!(
          {Ottla.Supervisor,
           name: :"#{name}_sup",
           connection: name,
           endpoints: endpoints(),
           consumer: [
             topic: topic,
             partition: 1,
             begin_offset: :earliest,
             handler: Ottla.TestHandler,
             handler_init_args: %{pid: me, fun: fn _, s -> {:continue, s} end}
           ],
           group_consumer: [
             group: group_name(),
             topics: [group_topic],
             handler: Ottla.TestHandler,
             handler_init_args: %{pid: me},
             begin_offset: :earliest
           ]}
        )

      assert Process.whereis(:"#{name}_sup") == pid
      :ok = Ottla.produce(endpoints(), topic, ["one", "two"], partition: 1)
      :ok = Ottla.produce(endpoints(), group_topic, "grouped")

      assert_receive {:batch, _, ^topic, 1, [%{offset: 0}, %{offset: 1} = second]}, 30_000
      assert_receive {:batch, _, ^group_topic, 0, [%{value: "grouped"}]}, 30_000
      assert second.generation_id == nil

      assert :ok = Ottla.Consumer.ack(name, topic, 1, second.offset)
      assert :ok = stop_supervised(Ottla.Supervisor)
      refute Process.alive?(pid)
    end

    test "a handler taking 7 s finishes and acks during a graceful stop; nothing it acked comes again" do
      topic = create_topic!()
      :ok = Ottla.produce(endpoints(), topic, ["a", "b", "c"])
      group = group_name()
      me = self()

      slow = fn messages, s ->
        send(me, {:slow_started, Enum.map(messages, & &1.offset)})
        Process.sleep(7_000)
        {:ack, s}
      end

      conn = start_group!(topic, group, id: :slow, handler_init_args: %{pid: me, fun: slow})
      assert_receive {:slow_started, [0, 1, 2]}, 30_000
      {micros, :ok} = :timer.tc(fn -> stop_supervised(:slow) end)
      assert micros >= 5_000_000, "the stop did not wait for the handler"
      assert committed(group, topic) == %{0 => 3}

      :ok = Ottla.produce(endpoints(), topic, "d")
      # The first member's report of its batch is in the mailbox: drop it.
      assert_received {:batch, _, _, 0, [%{offset: 0} | _]}
      start_group!(topic, group, connection: conn, id: :again)
      assert_receive {:batch, _, _, 0, [%{offset: 3, value: "d"}]}, 30_000
      refute_receive {:batch, _, _, 0, _}, 1_000
    end
  end

  describe "finding a partition's worker (Elsa.Registry.whereis_name)" do
    test "whereis_worker/3 finds the worker handling a partition; killed, a new one takes over" do
      topic = create_topic!(partitions: 2)
      name = start_group!(topic, group_name())
      :ok = Ottla.produce(endpoints(), topic, "m1", partition: 0)
      :ok = Ottla.produce(endpoints(), topic, "m2", partition: 1)
      assert_receive {:batch, worker0, ^topic, 0, [%{value: "m1"}]}, 30_000
      assert_receive {:batch, worker1, ^topic, 1, [%{value: "m2"}]}, 30_000

      assert Ottla.Supervisor.whereis_worker(name, topic, 0) == worker0
      assert Ottla.Supervisor.whereis_worker(name, topic, 1) == worker1
      assert Ottla.Supervisor.whereis_worker(name, topic, 2) == nil
      assert Ottla.Supervisor.whereis_worker(name, "another-topic", 0) == nil
      assert Ottla.Supervisor.whereis_worker(:no_such_connection, topic, 0) == nil

      # Killed only once its batch is acked, so nothing it handled comes again.
      wait_until(fn -> Ottla.Group.Acknowledger.get_latest_offset(name, topic, 0) == 1 end)
      Process.exit(worker0, :kill)
      :ok = Ottla.produce(endpoints(), topic, "m3", partition: 0)
      :ok = Ottla.produce(endpoints(), topic, "m4", partition: 1)

      assert_receive {:batch, new_worker0, ^topic, 0, [%{offset: 1, value: "m3"}]}, 30_000
      assert_receive {:batch, ^worker1, ^topic, 1, [%{value: "m4"}]}, 30_000
      assert new_worker0 != worker0
      assert Ottla.Supervisor.whereis_worker(name, topic, 0) == new_worker0
      refute_receive {:batch, _, ^topic, 0, [%{offset: 0} | _]}, 1_000

      for {args, named} <- [
            {["conn", topic, 0], "connection"},
            {[name, :topic, 0], "topic"},
            {[name, topic, -1], ":partition"}
          ] do
        error =
          assert_raise ArgumentError, fn -> apply(Ottla.Supervisor, :whereis_worker, args) end

        assert error.message =~ named
      end
    end
  end

  defp port do
    [_, port] = String.split(endpoints(), ":")
    String.to_integer(port)
  end
end
