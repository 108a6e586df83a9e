defmodule Ottla.ClientsTest do
  # Admin, fetch and metadata calls reuse their connection's clients, or the clients cached
  # for their endpoints; stale partition counts are asked for again.
  use ExUnit.Case, async: true

  import Ottla.TestSupport

  alias Ottla.Connection

  defp start_connection!(opts \\ []) do
    name = conn_name()
    spec = {Ottla.Supervisor, [connection: name, endpoints: endpoints()] ++ opts}
    start_supervised!(Supervisor.child_spec(spec, id: name))
    name
  end

  # The same broker under a bootstrap string no other test uses (it repeated a number of
  # times of its own): cached clients of its own.
  defp own_endpoints do
    first = endpoints() |> String.split(",") |> hd()
    times = 2 + rem(System.unique_integer([:positive, :monotonic]), 50)
    Enum.map_join(1..times, ",", fn _ -> first end)
  end

  test "1,000 fetches and 150 admin calls on a connection create one fetch, one admin and one group client" do
    topic = create_topic!(partitions: 2)
    :ok = Ottla.produce(endpoints(), topic, ["a", "b", "c"], partition: 1)
    conn = start_connection!()
    assert Connection.clients_created(conn) == %{admin: 0, fetch: 0, group: 0}

    for _ <- 1..1_000 do
      assert {:ok, 3, [%{offset: 0, value: "a"}, %{value: "b"}, %{value: "c"}]} =
               Ottla.fetch(conn, topic, partition: 1, offset: 0)
    end

    for _ <- 1..50 do
      assert {:ok, topics} = Ottla.list_topics(conn)
      assert {topic, 2} in topics
      assert Ottla.topic?(conn, topic)
      assert {:ok, [{0, nil}, {1, nil}]} = Ottla.committed_offsets(conn, group_name(), topic)
    end

    # committed_offsets asked about 50 groups: one client per group, the last 8 kept.
    assert %{admin: 1, fetch: 1, group: 50} = Connection.clients_created(conn)

    group = group_name()
    for _ <- 1..20, do: {:ok, _} = Ottla.committed_offsets(conn, group, topic)
    assert %{admin: 1, fetch: 1, group: 51} = Connection.clients_created(conn)
  end

  test "concurrent fetches on a connection each read their own partition correctly" do
    topic = create_topic!(partitions: 4)

    for p <- 0..3 do
      :ok = Ottla.produce(endpoints(), topic, for(i <- 1..50, do: "p#{p}-#{i}"), partition: p)
    end

    conn = start_connection!()

    0..3
    |> Enum.map(fn p ->
      Task.async(fn ->
        for round <- 1..50 do
          offset = rem(round, 50)
          assert {:ok, 50, messages} = Ottla.fetch(conn, topic, partition: p, offset: offset)
          assert Enum.map(messages, & &1.value) == for(i <- (offset + 1)..50, do: "p#{p}-#{i}")
        end
      end)
    end)
    |> Task.await_many(60_000)

    # At most one fetch consumer per concurrent caller, and the admin client shared.
    assert %{admin: 1, fetch: fetchers} = Connection.clients_created(conn)
    assert fetchers in 1..4
  end

  test "calls given endpoints share cached clients, closed once idle" do
    topic = create_topic!()
    :ok = Ottla.produce(endpoints(), topic, ["x"])
    ep = own_endpoints()

    for _ <- 1..100 do
      assert {:ok, 1, [%{value: "x"}]} = Ottla.fetch(ep, topic)
      assert Ottla.topic?(ep, topic)
    end

    assert %{admin: 1, fetch: 1} = Connection.clients_created(ep)
    assert ep in Ottla.Native.clients_cached_bootstraps()

    previous = Application.get_env(:ottla, :endpoint_clients_idle)
    Application.put_env(:ottla, :endpoint_clients_idle, 300)

    try do
      # A new endpoints list (the idle time is the cached entry's, set when it was made).
      short = own_endpoints()
      assert Ottla.topic?(short, topic)
      assert short in Ottla.Native.clients_cached_bootstraps()

      wait_until(
        fn -> short not in Ottla.Native.clients_cached_bootstraps() end,
        5_000,
        "the idle cached clients to close"
      )

      # The next call opens new ones.
      assert Ottla.topic?(short, topic)
      assert %{admin: 1} = Connection.clients_created(short)
    after
      if previous,
        do: Application.put_env(:ottla, :endpoint_clients_idle, previous),
        else: Application.delete_env(:ottla, :endpoint_clients_idle)
    end
  end

  test "after create_partitions, an explicit partition beyond the old count works at once" do
    topic = create_topic!(partitions: 2)
    conn = start_connection!(producer: [])

    # Both the connection's clients and its producer learn the count 2.
    assert :ok = Ottla.produce(conn, topic, "p1", partition: 1)
    assert {:ok, 1, [_]} = Ottla.fetch(conn, topic, partition: 1)

    assert {:error, %Ottla.Error{code: :unknown_partition}} =
             Ottla.fetch(conn, topic, partition: 3)

    assert :ok = Ottla.create_partitions(endpoints(), topic, 4)

    assert :ok = Ottla.produce(conn, topic, "p3", partition: 3)
    assert {:ok, 1, [%{value: "p3"}]} = Ottla.fetch(conn, topic, partition: 3)
    assert {:ok, [{^topic, 4}]} = Ottla.list_topics(conn) |> only(topic)
  end

  test "fetch_stream reads every partition with one fetch consumer, and searches copy what they keep" do
    topic = create_topic!(partitions: 3)

    for p <- 0..2 do
      values = for i <- 0..299, do: {"k#{p}-#{i}", "v#{p}-#{i}"}
      :ok = Ottla.produce(endpoints(), topic, values, partition: p)
    end

    conn = start_connection!()

    streamed = Ottla.Fetch.fetch_stream(conn, topic, chunk_size: 7) |> Enum.map(& &1.value)
    assert streamed == for(p <- 0..2, i <- 0..299, do: "v#{p}-#{i}")
    assert %{fetch: 1} = Connection.clients_created(conn)

    # The stream's consumer went back to the pool when the stream ended: reused here.
    assert [%{value: "v1-5"}] =
             Ottla.Fetch.fetch_stream(conn, topic, partition: 1, start_offset: 5, end_offset: 6)
             |> Enum.to_list()

    assert %{fetch: 1} = Connection.clients_created(conn)

    [match] = Ottla.Fetch.search(conn, topic, &(&1.value == "v2-17")) |> Enum.to_list()
    assert match.key == "k2-17"
    assert length(Enum.to_list(Ottla.Fetch.search_values(conn, topic, "v2-17"))) == 11
    # Its own binaries: the chunk it came from is not kept alive by it.
    assert :binary.referenced_byte_size(match.value) == byte_size(match.value)
    assert :binary.referenced_byte_size(match.key) == byte_size(match.key)
  end

  test "a halted stream gives its consumer back" do
    topic = create_topic!()
    :ok = Ottla.produce(endpoints(), topic, for(i <- 1..100, do: "#{i}"))
    conn = start_connection!()

    for _ <- 1..5 do
      assert ["1", "2", "3"] =
               Ottla.Fetch.fetch_stream(conn, topic, chunk_size: 10)
               |> Enum.take(3)
               |> Enum.map(& &1.value)
    end

    # Each stream took the one consumer the last one gave back.
    assert %{fetch: 1} = Connection.clients_created(conn)
  end

  test "a connection's clients close with it; calls on it then raise" do
    conn = start_connection!()
    assert {:ok, _} = Ottla.list_topics(conn)
    stop_supervised!(conn)
    assert_raise ArgumentError, ~r/no Ottla connection named/, fn -> Ottla.list_topics(conn) end
  end

  defp only({:ok, topics}, topic), do: {:ok, Enum.filter(topics, &(elem(&1, 0) == topic))}
end
