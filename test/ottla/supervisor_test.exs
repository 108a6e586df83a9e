defmodule Ottla.SupervisorTest do
  use ExUnit.Case, async: true

  import Ottla.TestSupport

  describe "a connection with a producer" do
    test "produces by connection name, with the connection's settings" do
      name = conn_name()

      start_supervised!(
        {Ottla.Supervisor,
         connection: name,
         endpoints: endpoints(),
         config: ["client.id": "ottla-supervisor-test"],
         producer: [topic: "ignored-for-routing", config: ["linger.ms": 1]]}
      )

      topic = create_topic!(partitions: 2)
      assert :ok = Ottla.produce(name, topic, [{"a", "1"}, {"b", "2"}], partition: 1)
      assert {2, msgs} = fetch_all!(topic, 1)
      assert Enum.map(msgs, & &1.value) == ["1", "2"]
    end

    test "admin and fetch calls accept the connection name" do
      name = conn_name()

      start_supervised!(
        {Ottla.Supervisor, connection: name, endpoints: endpoints(), producer: []}
      )

      topic = unique_topic()
      assert :ok = Ottla.create_topic(name, topic)
      assert Ottla.topic?(name, topic)
      assert :ok = Ottla.produce(name, topic, "x")
      assert {:ok, 1, [%Ottla.Message{value: "x"}]} = Ottla.fetch(name, topic)
    end

    test "stopping the connection delivers what it queued and forgets the name" do
      name = conn_name()

      pid =
        start_supervised!(
          {Ottla.Supervisor, connection: name, endpoints: endpoints(), producer: []}
        )

      topic = create_topic!()
      assert :ok = Ottla.produce(name, topic, "before stop")
      ref = Process.monitor(pid)
      stop_supervised!(Ottla.Supervisor)
      assert_receive {:DOWN, ^ref, :process, ^pid, _}, 15_000
      assert {1, _} = fetch_all!(topic, 0)

      assert {:error, %Ottla.Error{code: :no_connection}, [{"x", _}]} =
               Ottla.produce(name, topic, "x")

      assert_raise ArgumentError, ~r/no Ottla connection/, fn -> Ottla.fetch(name, topic) end
    end
  end

  test "producing on a connection started without :producer is a no_producer error" do
    name = conn_name()
    start_supervised!({Ottla.Supervisor, connection: name, endpoints: endpoints()})

    assert {:error, %Ottla.Error{code: :no_producer} = error, [{"x", error}]} =
             Ottla.produce(name, "any-topic", "x")
  end

  defp gc(extra \\ []),
    do: Keyword.merge([group: "g", topics: ["t"], handler: Ottla.TestHandler], extra)

  describe "bad options" do
    test "raise ArgumentError naming the option" do
      for {opts, name} <- [
            {[endpoints: endpoints()], ":connection"},
            {[connection: "string", endpoints: endpoints()], ":connection"},
            {[connection: :x], ":endpoints"},
            {[connection: :x, endpoints: 42], ":endpoints"},
            {[connection: :x, endpoints: endpoints(), config: [{"k", self()}]], ":config"},
            {[connection: :x, endpoints: endpoints(), producer: :yes], ":producer"},
            {[connection: :x, endpoints: endpoints(), producer: [topic: 1]], "topic"},
            {[connection: :x, endpoints: endpoints(), unknown: 1], "unknown"},
            {[connection: :x, endpoints: endpoints(), group_consumer: gc(instance_id: "")],
             ":instance_id"},
            {[connection: :x, endpoints: endpoints(), group_consumer: gc(instance_id: "a b")],
             ":instance_id"},
            {[connection: :x, endpoints: endpoints(), group_consumer: gc(instance_id: :a)],
             ":instance_id"},
            {[connection: :x, endpoints: endpoints(), group_consumer: gc(session_timeout: 0)],
             ":session_timeout"},
            {[
               connection: :x,
               endpoints: endpoints(),
               group_consumer: gc(isolation_level: :dirty)
             ], ":isolation_level"},
            {[connection: :x, endpoints: endpoints(), producer: [transactional_id: ""]],
             ":transactional_id"}
          ] do
        error = assert_raise ArgumentError, fn -> Ottla.Supervisor.start_link(opts) end
        assert error.message =~ name, "expected #{inspect(name)} in: #{error.message}"
      end
    end

    test ":session_timeout and :instance_id become librdkafka's session, heartbeat and group.instance.id; :config wins" do
      conn = [connection: :x, bootstrap: endpoints(), config: [], producer: nil]
      props = Ottla.Consumer.Options.group!(gc(), conn).props
      assert {"session.timeout.ms", "10000"} in props
      assert {"heartbeat.interval.ms", "1000"} in props
      refute List.keymember?(props, "group.instance.id", 0)

      props =
        Ottla.Consumer.Options.group!(
          gc(instance_id: "host-1.orders", session_timeout: 30_000),
          conn
        ).props

      assert {"group.instance.id", "host-1.orders"} in props
      assert {"heartbeat.interval.ms", "3000"} in props
      # librdkafka applies properties in order: the user's config comes after the defaults.
      props =
        Ottla.Consumer.Options.group!(gc(config: ["session.timeout.ms": 45_000]), conn).props

      assert List.last(for {"session.timeout.ms", v} <- props, do: v) == "45000"
    end

    test "an invalid librdkafka property makes start_link fail with an Ottla.Error" do
      Process.flag(:trap_exit, true)

      assert {:error,
              {:shutdown,
               {:failed_to_start_child, Ottla.Connection, %Ottla.Error{code: :invalid_config}}}} =
               Ottla.Supervisor.start_link(
                 connection: conn_name(),
                 endpoints: endpoints(),
                 producer: [config: ["not.a.property": "x"]]
               )
    end
  end

  test "librdkafka properties Ottla's guarantees rest on are refused, naming the property and why" do
    handler = [group: "g", topics: ["t"], handler: Ottla.TestHandler]

    for {opts, property} <- [
          {[group_consumer: handler ++ [config: ["enable.auto.commit": true]]],
           "enable.auto.commit"},
          {[group_consumer: handler ++ [config: ["enable.auto.offset.store": true]]],
           "enable.auto.offset.store"},
          {[config: ["group.id": "other"], group_consumer: handler], "group.id"},
          {[consumer: [topic: "t", handler: Ottla.TestHandler, config: ["group.id": "x"]]],
           "group.id"},
          {[config: ["bootstrap.servers": "elsewhere:9092"]], "bootstrap.servers"},
          {[producer: [config: ["delivery.report.only.error": true]]],
           "delivery.report.only.error"}
        ] do
      error =
        assert_raise ArgumentError, fn ->
          Ottla.Supervisor.start_link([connection: :x, endpoints: endpoints()] ++ opts)
        end

      assert error.message =~ inspect(property)
      assert error.message =~ "because"
    end

    error =
      assert_raise ArgumentError, fn ->
        Ottla.produce(endpoints(), "t", "x", config: ["enable.auto.commit": true])
      end

    assert error.message =~ "enable.auto.commit"
  end

  describe "producer defaults" do
    test "the producer is idempotent unless told otherwise" do
      Process.flag(:trap_exit, true)

      # librdkafka refuses more than 5 requests in flight with enable.idempotence=true: the
      # default is idempotent.
      assert {:error,
              {:shutdown,
               {:failed_to_start_child, Ottla.Connection,
                %Ottla.Error{code: :client_creation, message: message}}}} =
               Ottla.Supervisor.start_link(
                 connection: conn_name(),
                 endpoints: endpoints(),
                 producer: [config: ["max.in.flight.requests.per.connection": 10]]
               )

      assert message =~ "idempotence"

      name = conn_name()

      start_supervised!(
        {Ottla.Supervisor,
         connection: name,
         endpoints: endpoints(),
         producer: [
           config: ["enable.idempotence": false, "max.in.flight.requests.per.connection": 10]
         ]}
      )

      topic = create_topic!()
      assert :ok = Ottla.produce(name, topic, "x")
    end
  end
end
